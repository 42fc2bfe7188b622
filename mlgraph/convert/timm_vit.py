"""timm ViT state dict (`vit_base_patch16_224`, `vit_large_patch16_224`, ...) -> `backbones.vit`.

Settings are read from the shapes: width and patch size from `patch_embed.proj.weight`, depth
from the `blocks.{i}.` indices, the MLP ratio from `blocks.0.mlp.fc1.weight`, the checkpoint's
grid from `pos_embed` and the class count from `head.weight`. The head count is not in a state
dict: it is the option `num_heads`, or else timm's value for the width (192: 3, 384: 6, 768: 12,
1024: 16, 1280: 16), or width // 64 for any other width, which is a guess: it is listed under
`settings["assumed"]` and named in a warning line (`--strict`: an error).

Options:
  include_head: bool, default True; False drops `head.*` and builds the backbone without a head
    (what SALGL does: its ViT returns tokens and its head is never used).
  image_size: int, default 0 (= the checkpoint's own size, grid x patch); another size resizes
    `pos_embed` bicubically (torch's kernel, CLS row kept), as SALGL's timm does for 448/576.
  num_heads: int, default 0 (= the rule above).
  prefix: str, default ""; only keys under this prefix are used (e.g. "module.backbone.").

Formats: PyTorch-named state dicts (`.pth`/`.bin`/`.safetensors`, or an `.npz` holding the same
names). big_vision `.npz` files (`Transformer/encoderblock_0/...`) are not supported: load them
into timm once (`timm.models.vision_transformer._load_weights`) and save its `state_dict()`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core
from mlgraph.models.backbones import vit

OPTIONS = {"include_head": True, "image_size": 0, "num_heads": 0, "prefix": ""}
# timm's head count for each standard width.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Registry names of the standard sizes (`mlgraph.models.backbones.BACKBONES`).
REGISTERED = {"B/16": "vit_b16", "L/16": "vit_l16"}


def _pos_embed_to(grid: int) -> core.Transform:
    """The checkpoint's position table, resized to `grid` when its grid differs."""

    def transform(w: np.ndarray) -> np.ndarray:
        if w.ndim == 3 and w.shape[1] != 1 + grid * grid:
            return vit.resize_pos_embed(w, grid)
        return w

    return transform


def table(module: vit.VisionTransformer, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """NNX path -> (timm key, transform) for every variable of `module`.

    `pos_embed` is resized to the module's grid when the checkpoint's grid differs.
    """
    p = prefix
    t: dict[str, tuple[str, Any]] = {
        "patch_embed/proj/kernel": (f"{p}patch_embed.proj.weight", core.conv_kernel),
        "patch_embed/proj/bias": (f"{p}patch_embed.proj.bias", core.identity),
        "cls_token": (f"{p}cls_token", core.identity),
        "pos_embed": (f"{p}pos_embed", _pos_embed_to(module.grid)),
    }
    for i in range(len(module.blocks)):
        path, key = f"blocks/{i}", f"{p}blocks.{i}"
        t |= core.layer_norm(f"{path}/norm1", f"{key}.norm1")
        t |= core.linear(f"{path}/attn/qkv", f"{key}.attn.qkv")
        t |= core.linear(f"{path}/attn/proj", f"{key}.attn.proj")
        t |= core.layer_norm(f"{path}/norm2", f"{key}.norm2")
        t |= core.linear(f"{path}/mlp/fc1", f"{key}.mlp.fc1")
        t |= core.linear(f"{path}/mlp/fc2", f"{key}.mlp.fc2")
    t |= core.layer_norm("norm", f"{p}norm")
    if module.head is not None:
        t |= core.linear("head", f"{p}head")
    return t


def infer_settings(
    state_dict: Mapping[str, np.ndarray],
    *,
    include_head: bool = True,
    image_size: int = 0,
    num_heads: int = 0,
) -> dict[str, Any]:
    """Read the build settings of a timm ViT from its keys and shapes.

    Returns {"kind": "backbone", "backbone": "vit_b16" | "vit_l16" | None, "image_size",
    "width", "depth", "num_heads", "patch_size", "mlp_ratio", "num_classes", "variant"}, and
    "assumed": {"num_heads": n} when the width is not a standard one and no num_heads was given;
    "variant" is the `vit.VARIANTS` key the sizes match, or None (then build with variant=None).
    """
    if any(k.startswith(("Transformer/", "embedding/")) for k in state_dict):
        raise core.ConversionError(
            "this looks like a big_vision .npz (keys 'Transformer/...'), which is not supported; "
            "load it into timm and save the model's state_dict() instead"
        )
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise core.ConversionError(
                f"no {key!r}: not a timm ViT state dict with a class token "
                f"(first keys: {', '.join(list(state_dict)[:5])})"
            )
    w = state_dict["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise core.ConversionError(
            f"patch_embed.proj.weight has shape {w.shape}; expected (width, 3, p, p)"
        )
    width, patch = int(w.shape[0]), int(w.shape[2])
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        raise core.ConversionError(f"block indices are not 0..n-1: {sorted(blocks)}")
    positions = int(state_dict["pos_embed"].shape[1]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise core.ConversionError(f"pos_embed has {positions} grid positions, not a square")
    heads, assumed = core.head_count(width, num_heads, HEADS_BY_WIDTH)
    mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width
    sizes = {"width": width, "depth": len(blocks), "num_heads": heads, "patch_size": patch}
    variant = next(
        (name for name, v in vit.VARIANTS.items() if v == sizes and mlp_ratio == 4.0), None
    )
    has_head = "head.weight" in state_dict and include_head
    return {
        "kind": "backbone",
        "backbone": REGISTERED.get(variant),
        "variant": variant,
        "image_size": image_size or grid * patch,
        **sizes,
        "mlp_ratio": mlp_ratio,
        "num_classes": int(state_dict["head.weight"].shape[0]) if has_head else None,
        # Only when the head count is a guess (`core.head_count`), so that it is named.
        **({"assumed": assumed} if assumed else {}),
    }


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the ViT that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = core.select_prefix(state_dict, opts["prefix"])
    settings = infer_settings(
        state_dict,
        include_head=opts["include_head"],
        image_size=opts["image_size"],
        num_heads=opts["num_heads"],
    )
    try:
        # Built abstractly (no random init): every variable is then set from the checkpoint.
        module = nnx.eval_shape(
            lambda: vit.create(
                variant=None,
                image_size=settings["image_size"],
                width=settings["width"],
                depth=settings["depth"],
                num_heads=settings["num_heads"],
                patch_size=settings["patch_size"],
                mlp_ratio=settings["mlp_ratio"],
                num_classes=settings["num_classes"],
                rngs=nnx.Rngs(0),
            )
        )
    except ValueError as e:
        raise core.ConversionError(f"timm ViT: {e}") from e
    # The head (and old in21k checkpoints' `pre_logits` representation layer) is dropped only
    # when asked; timm `head_dist`/`dist_token` (DeiT) are reported as unexpected.
    ignored = [] if opts["include_head"] else [r"head\..*", r"pre_logits\..*"]
    core.load_into(module, state_dict, table(module), ignored=ignored, source="timm ViT")
    return module, settings

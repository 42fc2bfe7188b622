"""OpenAI CLIP (ViT) state dict -> `backbones.clip.ImageTower` or `backbones.clip.TextTower`.

The input is OpenAI's own JIT archive (`ViT-B-16.pt`, read directly with `torch.jit.load`), or
the state dict of OpenAI's `model.py` CLIP saved as a `.pth`/`.safetensors`: image keys under
`visual.`, text keys unprefixed (docs/sigrl.md §6.2). One tower is converted per call (option
`tower`); the other tower's keys, `logit_scale` and the JIT archive's
`input_resolution`/`context_length`/`vocab_size` are ignored on purpose.

Settings are read from the shapes. Image: width and patch from `visual.conv1.weight`, depth
from the resblock indices, the checkpoint grid from `visual.positional_embedding`, embed_dim
from `visual.proj`. Text: width from `ln_final.weight`, depth from the resblock indices,
context length from `positional_embedding`, vocabulary from `token_embedding.weight`,
embed_dim from `text_projection`. Heads: the option `num_heads`, else OpenAI's own rule
width // 64 (ViT-B/16: 12 image heads, 8 text heads). ResNet CLIPs (RN50, ...) are not
supported.

Options:
  tower: "visual" (default; settings kind "backbone") or "text" (kind "text_encoder").
  image_size: int, default 0 (= the checkpoint's own); another size resizes the grid part of
    `visual.positional_embedding` bicubically (torch's kernel), the CLS row kept.
  num_heads: int, default 0 (= width // 64).
  prefix: str, default ""; prepended to every CLIP key (e.g. "module.clip.").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core
from mlgraph.models.backbones import clip, vit

OPTIONS = {"tower": "visual", "image_size": 0, "num_heads": 0, "prefix": ""}
TOWERS = ("visual", "text")
# Registry name suggested for the standard image tower.
REGISTERED = {"ViT-B/16": "clip_vit_b16"}
# Keys of a CLIP state dict that belong to neither tower.
SHARED_IGNORED = ["logit_scale", "input_resolution", "context_length", "vocab_size"]
TEXT_KEYS = [
    r"token_embedding\.weight",
    r"positional_embedding",
    r"transformer\..*",
    r"ln_final\..*",
    r"text_projection",
]


def _blocks(transformer: clip.Transformer, key_prefix: str) -> dict[str, tuple[str, Any]]:
    t: dict[str, tuple[str, Any]] = {}
    for i in range(len(transformer.resblocks)):
        path, key = f"transformer/resblocks/{i}", f"{key_prefix}transformer.resblocks.{i}"
        t |= core.layer_norm(f"{path}/ln_1", f"{key}.ln_1")
        # The packed in_proj (3D, D), rows [q; k; v], becomes one (D, 3D) kernel whose columns
        # keep that order, which is how `MultiheadAttention` splits it.
        t[f"{path}/attn/in_proj/kernel"] = (f"{key}.attn.in_proj_weight", core.linear_kernel)
        t[f"{path}/attn/in_proj/bias"] = (f"{key}.attn.in_proj_bias", core.identity)
        t |= core.linear(f"{path}/attn/out_proj", f"{key}.attn.out_proj")
        t |= core.layer_norm(f"{path}/ln_2", f"{key}.ln_2")
        t |= core.linear(f"{path}/mlp/c_fc", f"{key}.mlp.c_fc")
        t |= core.linear(f"{path}/mlp/c_proj", f"{key}.mlp.c_proj")
    return t


def _positions_to(grid: int) -> core.Transform:
    """The image position table [1 + g*g, D], resized to `grid` when its grid differs."""

    def transform(w: np.ndarray) -> np.ndarray:
        if w.ndim == 2 and w.shape[0] != 1 + grid * grid:
            return vit.resize_pos_embed(w[None], grid)[0]
        return w

    return transform


def table(module: clip.ImageTower | clip.TextTower, prefix: str = "") -> dict[str, tuple]:
    """NNX path -> (CLIP key, transform) for every variable of either tower.

    `prefix` is prepended to every CLIP key; image keys get `visual.` after it.
    """
    if isinstance(module, clip.TextTower):
        p = prefix
        t: dict[str, tuple[str, Any]] = {
            "token_embedding/embedding": (f"{p}token_embedding.weight", core.identity),
            "positional_embedding": (f"{p}positional_embedding", core.identity),
            "text_projection": (f"{p}text_projection", core.identity),
        }
        t |= core.layer_norm("ln_final", f"{p}ln_final")
        return t | _blocks(module.transformer, p)
    p = f"{prefix}visual."
    t = {
        "conv1/kernel": (f"{p}conv1.weight", core.conv_kernel),
        "class_embedding": (f"{p}class_embedding", core.identity),
        "positional_embedding": (f"{p}positional_embedding", _positions_to(module.grid)),
        "proj": (f"{p}proj", core.identity),
    }
    t |= core.layer_norm("ln_pre", f"{p}ln_pre") | core.layer_norm("ln_post", f"{p}ln_post")
    return t | _blocks(module.transformer, p)


def _depth(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise core.ConversionError(
            f"{prefix}transformer.resblocks indices are not 0..n-1: {sorted(blocks)}"
        )
    return len(blocks)


def _require(state_dict: Mapping[str, np.ndarray], keys: list[str], what: str) -> None:
    for key in keys:
        if key not in state_dict:
            raise core.ConversionError(
                f"no {key!r}: not an OpenAI CLIP ViT state dict with {what} "
                f"(first keys: {', '.join(list(state_dict)[:5])})"
            )


def _heads(width: int, num_heads: int) -> int:
    heads = num_heads or width // 64
    if heads <= 0 or width % heads:
        raise core.ConversionError(
            f"cannot split width {width} into {heads} heads; pass the option num_heads"
        )
    return heads


def infer_visual_settings(
    state_dict: Mapping[str, np.ndarray], *, image_size: int = 0, num_heads: int = 0, prefix=""
) -> dict[str, Any]:
    """Build settings of the image tower: {"kind": "backbone", "backbone", "variant",
    "image_size", "width", "depth", "num_heads", "patch_size", "embed_dim"}."""
    p = f"{prefix}visual."
    if f"{p}layer1.0.conv1.weight" in state_dict:
        raise core.ConversionError("ResNet CLIP image towers (RN50, ...) are not supported")
    _require(
        state_dict, [f"{p}conv1.weight", f"{p}positional_embedding", f"{p}proj"], "an image tower"
    )
    w = state_dict[f"{p}conv1.weight"]
    width, patch = int(w.shape[0]), int(w.shape[-1])
    positions = int(state_dict[f"{p}positional_embedding"].shape[0]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise core.ConversionError(f"{p}positional_embedding has {positions} grid positions")
    sizes = {
        "width": width,
        "depth": _depth(state_dict, p),
        "num_heads": _heads(width, num_heads),
        "patch_size": patch,
        "embed_dim": int(state_dict[f"{p}proj"].shape[1]),
    }
    variant = next((n for n, v in clip.VARIANTS.items() if v == sizes), None)
    return {
        "kind": "backbone",
        "backbone": REGISTERED.get(variant),
        "variant": variant,
        "image_size": image_size or grid * patch,
        **sizes,
    }


def infer_text_settings(
    state_dict: Mapping[str, np.ndarray], *, num_heads: int = 0, prefix: str = ""
) -> dict[str, Any]:
    """Build settings of the text tower: {"kind": "text_encoder", "backbone": None,
    "encoder": "clip", "width", "depth", "num_heads", "embed_dim", "context_length",
    "vocab_size"}."""
    p = prefix
    keys = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"]
    _require(state_dict, [p + k for k in keys], "a text tower")
    width = int(state_dict[f"{p}ln_final.weight"].shape[0])
    return {
        "kind": "text_encoder",
        "backbone": None,
        "encoder": "clip",
        "width": width,
        "depth": _depth(state_dict, p),
        "num_heads": _heads(width, num_heads),
        "embed_dim": int(state_dict[f"{p}text_projection"].shape[1]),
        "context_length": int(state_dict[f"{p}positional_embedding"].shape[0]),
        "vocab_size": int(state_dict[f"{p}token_embedding.weight"].shape[0]),
    }


def build(settings: Mapping[str, Any], *, rngs: nnx.Rngs | None = None, **kwargs):
    """The (unfilled) tower that `settings` (from `convert`) describe; kwargs e.g. `dtype`."""
    rngs = rngs or nnx.Rngs(0)
    if settings["kind"] == "text_encoder":
        names = ("width", "depth", "num_heads", "embed_dim", "context_length", "vocab_size")
        return clip.create_text(
            variant=None, rngs=rngs, **{k: settings[k] for k in names}, **kwargs
        )
    names = ("image_size", "width", "depth", "num_heads", "patch_size", "embed_dim")
    return clip.create(variant=None, rngs=rngs, **{k: settings[k] for k in names}, **kwargs)


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the requested CLIP tower from `state_dict` and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    if opts["tower"] not in TOWERS:
        raise core.ConversionError(f"option tower={opts['tower']!r}: expected one of {TOWERS}")
    p = opts["prefix"]
    # Keys outside the prefix are not CLIP's (e.g. a method's heads) and are not looked at.
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(p)}
    ignored = [re.escape(p) + k for k in SHARED_IGNORED]
    if opts["tower"] == "text":
        settings = infer_text_settings(state_dict, num_heads=opts["num_heads"], prefix=p)
        ignored.append(re.escape(p) + r"visual\..*")
    else:
        settings = infer_visual_settings(
            state_dict, image_size=opts["image_size"], num_heads=opts["num_heads"], prefix=p
        )
        ignored += [re.escape(p) + k for k in TEXT_KEYS]
    try:
        # Built abstractly (no random init): every variable is then set from the checkpoint.
        module = nnx.eval_shape(lambda: build(settings))
    except ValueError as e:
        raise core.ConversionError(f"OpenAI CLIP: {e}") from e
    core.load_into(
        module, state_dict, table(module, p), ignored=ignored, source=f"OpenAI CLIP {opts['tower']}"
    )
    return module, settings

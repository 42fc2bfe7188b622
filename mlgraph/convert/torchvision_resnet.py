"""torchvision bottleneck ResNet (50/101/152, v1.5) state dict -> `backbones.resnet.ResNet`.

Settings are read from the keys and shapes: blocks per stage from the `layer{L}.{b}.` indices,
the width from `conv1.weight`, and the class count from `fc.weight` (the head is kept when it is
present, unless the option `include_head=False`).

Options:
  include_head: bool, default True; False drops `fc.*` and builds the backbone without a head.
  prefix: str, default ""; only keys under this prefix are used (e.g. "module.backbone." for a
    backbone inside a method checkpoint); the others are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core
from mlgraph.models.backbones import resnet

OPTIONS = {"include_head": True, "prefix": ""}
IGNORED = [r".*num_batches_tracked"]


def table(module: resnet.ResNet, prefix: str = "") -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every variable of `module`.

    `prefix` is prepended to every torch key (e.g. "backbone." inside a method checkpoint).
    """
    t = {"conv1/kernel": (f"{prefix}conv1.weight", core.conv_kernel)}
    t |= core.bn_entries("bn1", f"{prefix}bn1")
    for stage in range(1, 5):
        for b, block in enumerate(getattr(module, f"layer{stage}")):
            path, key = f"layer{stage}/{b}", f"{prefix}layer{stage}.{b}"
            for i in (1, 2, 3):
                t[f"{path}/conv{i}/kernel"] = (f"{key}.conv{i}.weight", core.conv_kernel)
                t |= core.bn_entries(f"{path}/bn{i}", f"{key}.bn{i}")
            if block.downsample_conv is not None:
                t[f"{path}/downsample_conv/kernel"] = (
                    f"{key}.downsample.0.weight",
                    core.conv_kernel,
                )
                t |= core.bn_entries(f"{path}/downsample_bn", f"{key}.downsample.1")
    if module.fc is not None:
        t["fc/kernel"] = (f"{prefix}fc.weight", core.linear_kernel)
        t["fc/bias"] = (f"{prefix}fc.bias", core.identity)
    return t


def block_layout(state_dict: Mapping[str, np.ndarray]) -> list[int]:
    """Blocks per stage, counted from the `layer{L}.{b}.` key indices."""
    layers = []
    for stage in range(1, 5):
        pattern = re.compile(rf"layer{stage}\.(\d+)\.")
        blocks = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
        if not blocks:
            raise core.ConversionError(f"no 'layer{stage}.*' keys: not a 4-stage ResNet")
        if blocks != set(range(len(blocks))):
            raise core.ConversionError(
                f"layer{stage} block indices are not 0..n-1: {sorted(blocks)}"
            )
        layers.append(len(blocks))
    return layers


def infer_settings(
    state_dict: Mapping[str, np.ndarray], *, include_head: bool = True
) -> dict[str, Any]:
    """Read the build settings from the keys and shapes of a torchvision ResNet state dict.

    Returns {"backbone": registry name, "width": int, "num_classes": int | None} plus
    "layers" when the block layout is not one of ResNet-50/101/152. A non-standard layout is
    reported as "resnet50" (the same Bottleneck family) with its "layers" override.
    """
    if "conv1.weight" not in state_dict:
        raise core.ConversionError(
            "no 'conv1.weight': not a torchvision ResNet state dict "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    layers = block_layout(state_dict)
    if "layer1.0.conv3.weight" not in state_dict:
        raise core.ConversionError(
            "no 'layer1.0.conv3.weight': only bottleneck ResNets (50/101/152) are supported, "
            "not BasicBlock ones (18/34)"
        )
    settings: dict[str, Any] = {"kind": "backbone"}
    depth = {v: k for k, v in resnet.LAYOUTS.items()}.get(tuple(layers))
    settings["backbone"] = f"resnet{depth}" if depth else "resnet50"
    if depth is None:
        settings["layers"] = layers
    settings["width"] = int(state_dict["conv1.weight"].shape[0])
    has_fc = "fc.weight" in state_dict
    settings["num_classes"] = (
        int(state_dict["fc.weight"].shape[0]) if has_fc and include_head else None
    )
    return settings


def trunk_settings(state_dict: Mapping[str, np.ndarray]) -> tuple[str, dict[str, Any]]:
    """(registry name, backbone_kwargs) of the ResNet trunk inside a method checkpoint (keys
    without the trunk's prefix): `layers` when the block layout is not ResNet-50/101/152's,
    `width` when the stem is not 64 wide, so that `backbone_kwargs` stays empty for the
    standard nets."""
    rs = infer_settings(state_dict, include_head=False)
    kwargs: dict[str, Any] = {}
    if "layers" in rs:
        kwargs["layers"] = list(rs["layers"])
    if rs["width"] != 64:
        kwargs["width"] = rs["width"]
    return rs["backbone"], kwargs


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the ResNet that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = core.select_prefix(state_dict, opts["prefix"])
    settings = infer_settings(state_dict, include_head=opts["include_head"])
    layers = block_layout(state_dict)
    # Abstract build: every variable is overwritten by `load_into`, so random init is wasted work.
    module = nnx.eval_shape(
        lambda: resnet.create(
            image_size=224,
            layers=layers,
            width=settings["width"],
            num_classes=settings["num_classes"],
            rngs=nnx.Rngs(0),
        )
    )
    ignored = list(IGNORED) + ([] if opts["include_head"] else [r"fc\..*"])
    core.load_into(module, state_dict, table(module), ignored=ignored, source="torchvision ResNet")
    return module, settings

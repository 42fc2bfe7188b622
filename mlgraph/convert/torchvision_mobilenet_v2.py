"""torchvision MobileNetV2 (width 1.0) state dict -> `backbones.mobilenet_v2.MobileNetV2`.

The class count is read from `classifier.1.weight`; the head is kept when present unless the
option `include_head=False`.

Options:
  include_head: bool, default True; False drops `classifier.*` and builds the backbone alone.
  prefix: str, default ""; only keys under this prefix are used, the others are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core
from mlgraph.models.backbones import mobilenet_v2

OPTIONS = {"include_head": True, "prefix": ""}
IGNORED = [r".*num_batches_tracked"]


def _conv_bn(path: str, conv_key: str, bn_key: str) -> dict[str, tuple[str, core.Transform]]:
    return {f"{path}/conv/kernel": (f"{conv_key}.weight", core.conv_kernel)} | core.bn_entries(
        f"{path}/bn", bn_key
    )


def table(
    module: mobilenet_v2.MobileNetV2, prefix: str = ""
) -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every variable of `module`.

    torchvision numbers the parts of a block positionally, so the torch names depend on whether
    the block has an expansion conv: with one, `conv.0` expand, `conv.1` depthwise, `conv.2`
    project conv and `conv.3` its BN; without, `conv.0` depthwise, `conv.1`/`conv.2` project.
    """
    last = len(module.features) - 1
    f = f"{prefix}features"
    t = _conv_bn("features/0", f"{f}.0.0", f"{f}.0.1")
    for i in range(1, last):
        block, path, key = module.features[i], f"features/{i}", f"{f}.{i}.conv"
        n = 0
        if block.expand is not None:
            t |= _conv_bn(f"{path}/expand", f"{key}.0.0", f"{key}.0.1")
            n = 1
        t |= _conv_bn(f"{path}/depthwise", f"{key}.{n}.0", f"{key}.{n}.1")
        t |= _conv_bn(f"{path}/project", f"{key}.{n + 1}", f"{key}.{n + 2}")
    t |= _conv_bn(f"features/{last}", f"{f}.{last}.0", f"{f}.{last}.1")
    if module.classifier is not None:
        t["classifier/kernel"] = (f"{prefix}classifier.1.weight", core.linear_kernel)
        t["classifier/bias"] = (f"{prefix}classifier.1.bias", core.identity)
    return t


def infer_settings(
    state_dict: Mapping[str, np.ndarray], *, include_head: bool = True
) -> dict[str, Any]:
    """Settings {"kind", "backbone", "num_classes"} read from a torchvision MobileNetV2 dict."""
    stem = state_dict.get("features.0.0.weight")
    if stem is None:
        raise core.ConversionError(
            "no 'features.0.0.weight': not a torchvision MobileNetV2 state dict "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    if stem.shape[0] != mobilenet_v2.STEM_CHANNELS:
        raise core.ConversionError(
            f"features.0.0.weight has {stem.shape[0]} output channels; only width multiplier "
            f"1.0 ({mobilenet_v2.STEM_CHANNELS} channels) is supported"
        )
    has_head = "classifier.1.weight" in state_dict
    num_classes = int(state_dict["classifier.1.weight"].shape[0]) if has_head else None
    return {
        "kind": "backbone",
        "backbone": "mobilenet_v2",
        "num_classes": num_classes if include_head else None,
    }


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the MobileNetV2 that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = core.select_prefix(state_dict, opts["prefix"])
    settings = infer_settings(state_dict, include_head=opts["include_head"])
    # Abstract build: every variable is overwritten by `load_into`, so random init is wasted work.
    module = nnx.eval_shape(
        lambda: mobilenet_v2.create(
            image_size=224, num_classes=settings["num_classes"], rngs=nnx.Rngs(0)
        )
    )
    ignored = list(IGNORED) + ([] if opts["include_head"] else [r"classifier\..*"])
    core.load_into(
        module, state_dict, table(module), ignored=ignored, source="torchvision MobileNetV2"
    )
    return module, settings

"""Official ML-GCN checkpoint (`checkpoint.pth.tar` / `model_best.pth.tar`) -> `models.mlgcn`.

Key layout (docs/ssgrl_mlgcn.md §3.2): the backbone as `features.{0,1,4,5,6,7}` (conv1, bn1,
layer1..4), `gc1.weight` (E, hidden) and `gc2.weight` (hidden, D) stored (in, out) and copied
as they are, and `A` (C, C), the `gen_A` output, copied into the `A` buffer. The word vectors
are not in the checkpoint: pass the repository's (class-order-matching) vectors, e.g.
`data/coco/coco_glove_word2vec.pkl` as it is.

The container the official `engine.py` saves is {'epoch', 'arch', 'state_dict', 'best_score'}
(the weights are under 'state_dict'; the rest is listed in the summary).

The released head pools the layer4 map with a fixed `MaxPool2d(14, 14)`: global at 448 px only
(at 576 px it takes the top-left 14x14 of 18x18). The settings' model therefore records
pool='official' (`models.mlgcn`), so that the converted weights give the official outputs at
any size the released model runs at, and a config using them must set it too; the summary
says so.

Options:
  embed_path: str, required; the word vectors [C, E]: a .npy, .npz or pickled array such as
    the repository's `*_glove_word2vec.pkl`.
  image_size: int, default 0 (= 448, the official recipe's; the weights cannot tell the
    size a run trained at, so it is then listed under `settings["assumed"]` and named in a
    warning line, `--strict`: an error).
  prefix: str, default "module."; stripped from every key that has it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core, torchvision_resnet
from mlgraph.errors import ConfigError
from mlgraph.labels.embeddings import load_embeddings
from mlgraph.models import mlgcn

OPTIONS = {"embed_path": "", "image_size": 0, "prefix": "module."}
DEFAULT_IMAGE_SIZE = 448  # the official recipe's input side
IGNORED = [r".*num_batches_tracked"]
REQUIRED = ("gc1.weight", "gc2.weight", "A", "features.0.weight")
POOL_NOTE = (
    "pool='official': the released head's fixed MaxPool2d(14, 14) (global at 448 px only; at "
    "576 px the top-left 14x14 of the 18x18 map), so these weights give the official outputs; "
    "a config using them must set config.model.pool='official'"
)
# torchvision names -> the official nn.Sequential indices.
RENAMES = (("conv1.", "features.0."), ("bn1.", "features.1."))


def official_key(key: str) -> str:
    """A torchvision ResNet key -> its name in the official `features` Sequential."""
    m = re.match(r"layer([1-4])\.(.*)", key)
    if m:
        return f"features.{int(m.group(1)) + 3}.{m.group(2)}"
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise ValueError(f"no ML-GCN name for backbone key {key!r}")


def table(module: mlgcn.MLGCN, prefix: str = "") -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every variable of `module` but `embeddings`."""
    sub = torchvision_resnet.table(module.backbone)
    t = {f"backbone/{path}": (prefix + official_key(k), f) for path, (k, f) in sub.items()}
    t["gc1/weight"] = (f"{prefix}gc1.weight", core.identity)
    t["gc2/weight"] = (f"{prefix}gc2.weight", core.identity)
    t["A"] = (f"{prefix}A", core.identity)
    return t


def infer_settings(state_dict: Mapping[str, np.ndarray], *, image_size: int = 0) -> dict[str, Any]:
    """The weights-checkpoint settings of an official ML-GCN state dict (no prefix); an
    `image_size` of 0 takes 448 and lists it under "assumed"."""
    core.require_keys(state_dict, REQUIRED, "an ML-GCN")
    backbone_sd = {}
    for key, value in state_dict.items():
        m = re.match(r"features\.(\d+)\.(.*)", key)
        if not m:
            continue
        index, rest = int(m.group(1)), m.group(2)
        name = {0: "conv1", 1: "bn1"}.get(index, f"layer{index - 3}" if 4 <= index <= 7 else "")
        if name:
            backbone_sd[f"{name}.{rest}"] = value
    backbone, kwargs = torchvision_resnet.trunk_settings(backbone_sd)
    e, hidden = state_dict["gc1.weight"].shape
    c = state_dict["A"].shape[0]
    model = {"name": "mlgcn", "backbone": backbone, "backbone_kwargs": kwargs}
    model["hidden_dim"] = int(hidden)
    model["pool"] = "official"  # the released MaxPool2d(14, 14) (module docstring)
    # The word vectors and A are buffers filled from the converter's file and the checkpoint.
    build = {"embed_path": "", "embed_dim": int(e), "graph_path": ""}
    r = core.SettingsResolver("", defaults={"image_size": DEFAULT_IMAGE_SIZE})
    size = r.first("image_size", image_size or None)
    return core.model_settings(
        model, build, num_classes=c, image_size=size, assumed=r.assumed, notes=[POOL_NOTE]
    )


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the ML-GCN that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = core.strip_prefix(state_dict, opts["prefix"])
    if not opts["embed_path"]:
        raise core.ConversionError(
            "option embed_path is required: official ML-GCN checkpoints do not hold the word "
            "vectors (pass the repository's *_glove_word2vec.pkl, or a .npy [C, E], in the "
            "checkpoint's class order)"
        )
    settings = infer_settings(state_dict, image_size=opts["image_size"])
    c = settings["num_classes"]
    try:
        words = load_embeddings(opts["embed_path"], c, settings["build"]["embed_dim"])
    except ConfigError as e:
        raise core.ConversionError(f"ML-GCN: {e}") from e
    module = core.build_abstract(settings, "ML-GCN")
    core.load_into(
        module,
        state_dict,
        table(module),
        ignored=IGNORED,
        keep_init=["embeddings"],
        source="ML-GCN",
    )
    module.embeddings.set_value(np.asarray(words, np.float32))
    return module, settings

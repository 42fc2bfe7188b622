"""Official SSGRL checkpoint (`checkpoint_*.pth.tar` / `model_best_*.pth.tar`) -> `models.ssgrl`.

Key layout: docs/ssgrl_mlgcn.md §2.2 (`resnet_101.*`, `word_semantic.fc_{1,2,3,a}`,
`graph_net.fc_eq{3,4,5}_{w,u}`, `fc_output`, `classifiers`). C and D come from
`classifiers.weight`, the word-vector width E from `word_semantic.fc_2.weight`, the attention
width from `fc_1`, the backbone from the `resnet_101.layer{L}.{b}` keys.

The official files were pickled by Python 2.7 / PyTorch 0.4.1 inside a {'epoch', 'state_dict',
'best_mAP'} container, `best_mAP` a `numpy.float64`. `mlgraph.convert.io.read_checkpoint` reads
them as saved (latin1 for Python 2, numpy scalars allowed in the safe reader) and lists the
entries besides the weights in the summary.

Neither the word vectors nor the graph M is in the checkpoint (the official code keeps them as
plain attributes): pass the bundle's files as options, and they are stored as buffers.

Options:
  embed_path: str, required; the word vectors [C, E] (e.g. data/coco/vectors.npy; .npz and
    pickled arrays too).
  graph_path: str, required; the graph .npy [C, C] (e.g. data/coco/prob_train.npy), or counts
    (.npz, ML-GCN's adj .pkl).
  image_size: int, default 0 (= 576, the official protocol; the weights cannot tell the size a
    run trained at, so it is then listed under `settings["assumed"]` and named in a warning
    line, `--strict`: an error).
  reset_uses_update_u: bool, default True (the official forward; False = the paper's gate).
  prefix: str, default "module."; stripped from every key that has it (not in the official
    files, which are saved unwrapped, but harmless).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph import models
from mlgraph.convert import core, torchvision_resnet
from mlgraph.errors import ConfigError
from mlgraph.labels.embeddings import load_embeddings
from mlgraph.models import ssgrl

OPTIONS = {
    "embed_path": "",
    "graph_path": "",
    "image_size": 0,
    "reset_uses_update_u": True,
    "prefix": "module.",
}
IGNORED = [r".*num_batches_tracked"]
# The official main.py's input side (resize 640, crop 576); other runs trained at 448.
DEFAULT_IMAGE_SIZE = 576
BACKBONE = "resnet_101."
REQUIRED = (
    "classifiers.weight",
    "word_semantic.fc_1.weight",
    "word_semantic.fc_2.weight",
    "graph_net.fc_eq3_w.weight",
    "fc_output.weight",
    "resnet_101.conv1.weight",
)
# NNX gate name -> official name.
GATES = {
    "fc1_w": "fc_eq3_w",
    "fc1_u": "fc_eq3_u",
    "fc2_w": "fc_eq4_w",
    "fc2_u": "fc_eq4_u",
    "fc3_w": "fc_eq5_w",
    "fc3_u": "fc_eq5_u",
}


def table(module: ssgrl.SSGRL, prefix: str = "") -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every Param and batch statistic of `module`.

    The buffers `word_features` and `graph` are not in official checkpoints (see `convert`).
    """
    p = prefix
    sub = torchvision_resnet.table(module.backbone, prefix=f"{p}{BACKBONE}")
    t: dict[str, tuple[str, core.Transform]] = {f"backbone/{k}": v for k, v in sub.items()}
    ws = f"{p}word_semantic"
    t |= core.linear("word_semantic/linear1", f"{ws}.fc_1", bias=False)
    t |= core.linear("word_semantic/linear2", f"{ws}.fc_2", bias=False)
    t |= core.linear("word_semantic/hidden_linear", f"{ws}.fc_3")
    t |= core.linear("word_semantic/target_linear", f"{ws}.fc_a")
    for ours, theirs in GATES.items():
        t |= core.linear(f"graph_net/{ours}", f"{p}graph_net.{theirs}")
    t |= core.linear("fc_output", f"{p}fc_output")
    t["classifiers/weight"] = (f"{p}classifiers.weight", core.identity)
    t["classifiers/bias"] = (f"{p}classifiers.bias", core.identity)
    return t


def infer_settings(
    state_dict: Mapping[str, np.ndarray],
    *,
    image_size: int = 0,
    reset_uses_update_u: bool = True,
) -> dict[str, Any]:
    """The weights-checkpoint settings of an official SSGRL state dict (no prefix).

    Returns {"kind": "model", "model": {the config.model fields the weights fix}, "build":
    {embed/graph paths "" (the values live in the weights)}, "num_classes": C, "image_size": S,
    "assumed": {"image_size": 576} when `image_size` is 0}.
    """
    core.require_keys(state_dict, REQUIRED, "an SSGRL")
    c, d = state_dict["classifiers.weight"].shape
    att, e = state_dict["word_semantic.fc_2.weight"].shape
    backbone, kwargs = torchvision_resnet.trunk_settings(core.select_prefix(state_dict, BACKBONE))
    model = {
        "name": "ssgrl",
        "backbone": backbone,
        "backbone_kwargs": kwargs,
        "extra_pool": models.field_defaults("ssgrl")["extra_pool"],
        "att_dim": int(att),
        "num_steps": models.field_defaults("ssgrl")["num_steps"],
        "reset_uses_update_u": bool(reset_uses_update_u),
    }
    # The word vectors and the graph are buffers filled from the files given to the converter.
    build = {"embed_path": "", "embed_dim": int(e), "graph_path": ""}
    if state_dict["fc_output.weight"].shape != (d, 2 * d):
        raise core.ConversionError(
            f"fc_output.weight has shape {state_dict['fc_output.weight'].shape}; expected "
            f"({d}, {2 * d})"
        )
    r = core.SettingsResolver("", defaults={"image_size": DEFAULT_IMAGE_SIZE})
    size = r.first("image_size", image_size or None)
    return core.model_settings(model, build, num_classes=c, image_size=size, assumed=r.assumed)


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the SSGRL that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = core.strip_prefix(state_dict, opts["prefix"])
    for name in ("embed_path", "graph_path"):
        if not opts[name]:
            raise core.ConversionError(
                f"option {name} is required: official SSGRL checkpoints hold neither the word "
                "vectors nor the graph (pass the data bundle's files)"
            )
    settings = infer_settings(
        state_dict,
        image_size=opts["image_size"],
        reset_uses_update_u=opts["reset_uses_update_u"],
    )
    c = settings["num_classes"]
    try:
        words = load_embeddings(opts["embed_path"], c, settings["build"]["embed_dim"])
        graph = ssgrl.load_graph(
            opts["graph_path"], c, models.field_defaults("ssgrl")["graph_diagonal"]
        )
    except ConfigError as e:
        raise core.ConversionError(f"SSGRL: {e}") from e
    module = core.build_abstract(settings, "SSGRL")
    core.load_into(
        module,
        state_dict,
        table(module),
        ignored=IGNORED,
        keep_init=["word_features", "graph"],
        source="SSGRL",
    )
    module.word_features.set_value(np.asarray(words, np.float32))
    module.graph.set_value(np.asarray(graph, np.float32))
    return module, settings

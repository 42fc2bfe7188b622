"""Official Scob checkpoint (`best.pth`, `checkpoint-<epoch>.pth`) -> `models.scob`.

The official `chinopie` framework saves `{'model': state_dict, 'optimizer': Adam state (five
groups), 'extra': {'cur_epochi', 'best_score'}, 'scheduler': (StepLR state,)}` (docs/scob_spml.md
§4); `mlgraph.convert.io.read_checkpoint` takes the weights under `model` and lists the rest.

Keys (§4.3): `fb.backbone.*` (torchvision ResNet-50, its `fc` unused and dropped; the batch-norm
running statistics are the ones that drifted in training, kept as they are); per `ImageMid`
(`fm1_14`, `fm1_28`, `fm2_14`, `fm2_28`) `feat_conv.*`, `pos_encoder.{row,col}_embed.weight`,
`encoder.layers.{i}.*` and `encoder.norm.*`; `projector.projector{1,2}.*`; `fh.classifier.*`;
`g.logits` [N_train, C]. Each `ImageMid` also registers its modules a second time
(`linear_parts.0` = `feat_conv`, `linear_parts.1` = `pos_encoder`, `transformer_parts` =
`encoder`): those aliases are checked equal to the canonical keys and then ignored.

The label estimator's logits `g.logits` (Phi: the estimated labels of the N_train training
images) are carried over as the checkpoint's extra state `phi` (`checkpointing.load_extra`),
rows in the official data order (VOC: first appearance in the per-class lists; COCO: the
instances JSON's image order), which is not mlgraph's TFDS order. A run with `config.init_from=`
the converted folder takes its weights and starts its own label estimator.

Read from the shapes: the backbone layout, the width D, the FFN width, the layer count, the
position-table size, C and N_train. Not in the weights: the head count, the official model's
constant 8 (the architecture ported, like the rest of its code; the option is for other
variants), and the image size: the official transforms resize to 448, but a CNN's weights cannot
tell the size a run trained at, so without the option 448 is listed under `settings["assumed"]`
and named in a warning line (`--strict`: an error).

Options:
  image_size: int, default 0 (= 448, assumed).
  num_heads: int, default 8.
  prefix: str, default "module."; stripped from every key that has it (not in the official
    files, which are saved unwrapped, but harmless).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core, torch_transformer, torchvision_resnet

OPTIONS = {"image_size": 0, "num_heads": 8, "prefix": "module."}
DEFAULT_IMAGE_SIZE = 448  # the official transforms' Resize((448, 448))
BACKBONE = "fb.backbone."
MIDS = ("fm1_14", "fm1_28", "fm2_14", "fm2_28")
REQUIRED = (
    "fh.classifier.weight",
    "projector.projector1.weight",
    "g.logits",
    "fm1_14.feat_conv.weight",
    "fm1_28.feat_conv.weight",
    "fb.backbone.conv1.weight",
)
IGNORED = [r".*num_batches_tracked", r"fb\.backbone\.fc\..*", r"g\.logits"]


def mid_table(path: str, key: str, num_layers: int) -> dict[str, tuple[str, core.Transform]]:
    """Rows of one official `ImageMid` at `key` -> `scob.ImageMid` at `path`."""
    t = {
        f"{path}/feat_conv/kernel": (f"{key}.feat_conv.weight", core.conv_kernel),
        f"{path}/feat_conv/bias": (f"{key}.feat_conv.bias", core.identity),
        f"{path}/row_embed": (f"{key}.pos_encoder.row_embed.weight", core.identity),
        f"{path}/col_embed": (f"{key}.pos_encoder.col_embed.weight", core.identity),
    }
    for i in range(num_layers):
        t |= torch_transformer.encoder_layer(f"{path}/layers/{i}", f"{key}.encoder.layers.{i}")
    return t | core.layer_norm(f"{path}/norm", f"{key}.encoder.norm")


def table(module, num_layers: int) -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every variable of a `scob.Scob`."""
    sub = torchvision_resnet.table(module.backbone, prefix=BACKBONE)
    t: dict[str, tuple[str, core.Transform]] = {f"backbone/{k}": v for k, v in sub.items()}
    for mid in MIDS:
        t |= mid_table(mid, mid, num_layers)
    t |= core.linear("projector/projector1", "projector.projector1")
    t |= core.linear("projector/projector2", "projector.projector2")
    return t | core.linear("classifier", "fh.classifier")


def alias_of(key: str) -> str | None:
    """The canonical key a duplicate registration stands for, or None for a canonical key:
    `<mid>.linear_parts.0.X` -> `<mid>.feat_conv.X`, `<mid>.linear_parts.1.X` ->
    `<mid>.pos_encoder.X`, `<mid>.transformer_parts.X` -> `<mid>.encoder.X`."""
    m = re.fullmatch(r"(fm[12]_(?:14|28))\.(linear_parts\.([01])|transformer_parts)\.(.+)", key)
    if m is None:
        return None
    mid, part, index, rest = m.groups()
    if part == "transformer_parts":
        return f"{mid}.encoder.{rest}"
    return f"{mid}.{('feat_conv', 'pos_encoder')[int(index)]}.{rest}"


def drop_aliases(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict without the duplicate registrations, each checked equal to its
    canonical key.

    Raises:
      ConversionError: an alias whose canonical key is missing or holds other values.
    """
    out, problems = {}, []
    for key, value in state_dict.items():
        canonical = alias_of(key)
        if canonical is None:
            out[key] = value
        elif canonical not in state_dict:
            problems.append(f"{key} (no {canonical})")
        elif not np.array_equal(np.asarray(value), np.asarray(state_dict[canonical])):
            problems.append(f"{key} differs from {canonical}")
    if problems:
        raise core.ConversionError(
            f"duplicate registrations that do not match their modules: {', '.join(problems)}"
        )
    return out


def _layer_count(state_dict: Mapping[str, np.ndarray], mid: str) -> int:
    pattern = re.compile(rf"{mid}\.encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not layers or layers != set(range(len(layers))):
        raise core.ConversionError(
            f"{mid}.encoder.layers.*: layer indices {sorted(layers)}; expected 0..n-1"
        )
    return len(layers)


def infer_settings(
    state_dict: Mapping[str, np.ndarray], *, image_size: int = 0, num_heads: int = 8
) -> dict[str, Any]:
    """The weights-checkpoint settings of an official Scob state dict (no prefix, no aliases).

    Returns {"kind": "model", "model": {the config.model fields the weights fix},
    "num_classes": C, "image_size": S, "num_train_examples": N_train, "assumed":
    {"image_size": 448} when `image_size` is 0, "notes": [...]}.

    Raises:
      ConversionError: a state dict that is not Scob's, or shapes that disagree.
    """
    core.require_keys(state_dict, REQUIRED, "a Scob")
    c, features = state_dict["fh.classifier.weight"].shape
    dim, c32 = state_dict["fm1_14.feat_conv.weight"].shape[:2]
    c16 = state_dict["fm1_28.feat_conv.weight"].shape[1]
    num_layers = _layer_count(state_dict, "fm1_14")
    ffn = state_dict["fm1_14.encoder.layers.0.linear1.weight"].shape[0]
    pos_table = state_dict["fm1_14.pos_encoder.row_embed.weight"].shape[0]
    n_train, c_phi = state_dict["g.logits"].shape
    backbone, kwargs = torchvision_resnet.trunk_settings(core.select_prefix(state_dict, BACKBONE))
    layer3 = state_dict[f"{BACKBONE}layer3.0.conv3.weight"].shape[0]
    layer4 = state_dict[f"{BACKBONE}layer4.0.conv3.weight"].shape[0]
    checks = [
        (features == 2 * dim, f"fh.classifier.weight has {features} inputs, not 2 x {dim}"),
        (c_phi == c, f"g.logits has {c_phi} classes, the classifier {c}"),
        (
            (c32, c16) == (layer4, layer3),
            f"feat_conv inputs {c32}/{c16}, backbone {layer4}/{layer3}",
        ),
        (dim % num_heads == 0, f"width {dim} is not divisible by num_heads={num_heads}"),
    ]
    problems = [text for ok, text in checks if not ok]
    if problems:
        raise core.ConversionError("; ".join(problems))
    model = {
        "name": "scob",
        "backbone": backbone,
        "backbone_kwargs": kwargs,
        "dim": int(dim),
        "num_heads": int(num_heads),
        "num_layers": num_layers,
        "ffn_dim": int(ffn),
        "pos_table": int(pos_table),
    }
    notes = [
        f"label estimator g.logits [{n_train}, {c}] kept as the extra state 'phi' (rows in "
        "the official data order; a run from these weights starts its own)",
        "backbone batch-norm statistics are the checkpoint's (they drift in Scob's training)",
    ]
    r = core.SettingsResolver("", defaults={"image_size": DEFAULT_IMAGE_SIZE})
    size = r.first("image_size", image_size or None)
    return core.model_settings(
        model,
        {},
        num_classes=c,
        image_size=size,
        assumed=r.assumed,
        num_train_examples=int(n_train),
        notes=notes,
    )


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict, dict[str, np.ndarray]]:
    """Build the Scob `state_dict` describes and fill it; returns (module, settings, extra
    state {'phi': g.logits})."""
    opts = core.check_options(options, OPTIONS)
    state_dict = drop_aliases(core.strip_prefix(state_dict, opts["prefix"]))
    settings = infer_settings(
        state_dict, image_size=opts["image_size"], num_heads=opts["num_heads"]
    )
    module = core.build_abstract(settings, "Scob")
    num_layers = settings["model"]["num_layers"]
    core.load_into(module, state_dict, table(module, num_layers), ignored=IGNORED, source="Scob")
    return module, settings, {"phi": np.asarray(state_dict["g.logits"], np.float32)}

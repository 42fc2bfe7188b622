"""Official Query2Label checkpoint (`checkpoint.pkl` + `config_new.json`) -> `models.q2l`.

The container `main_mlc.py` saves is {'epoch', 'arch', 'state_dict', 'best_mAP' (a
`numpy.float64`), 'optimizer'}; `mlgraph.convert.io.read_checkpoint` reads it as saved and the
summary lists the entries besides the weights. The backbone's FrozenBatchNorm2d keeps its
affine as buffers; here it is the batch norms' scale and bias, which the official recipe never
trains (`recipes.Q2L_FROZEN_BACKBONE` in `optimizer.frozen`).

Key layout (docs/ssgrl_mlgcn.md §4.2), after `module.` is stripped:
  backbone.0.body.{conv1,bn1,layer1..4}.*   torchvision ResNet (FrozenBatchNorm2d buffers)
  backbone.1.pe                             the sine table (1, D, S/32, S/32), checked, not kept
  input_proj.{weight,bias}                  only with keep_input_proj (a 1x1 conv)
  transformer.encoder.layers.{i}.*          DETR post-norm encoder layers
  transformer.decoder.layers.{i}.*          decoder layers; self_attn/norm1 only when kept
  transformer.decoder.norm.*, query_embed.weight (K, D), fc.W (1, K, D), fc.b (1, K)

Read from the shapes: K, D, the FFN width, the encoder and decoder depths, the input projection,
which decoder layers keep self-attention, the ResNet depth, and the training size (from the
table). The number of heads is not in the weights: it comes from `config_new.json` (option
`config`, else the file beside the checkpoint; its `nheads` is required reading: q2l_infer.py's
own defaults do not match the released models) or option `num_heads`; without either, the
README recipe's 4 is taken, listed under `settings["assumed"]` and named in a warning line
(`--strict`: an error). Values the json also implies by shape are checked.

Options:
  config: str, default "" (= `config_new.json` beside the checkpoint or one folder up); the
    released `config_new.json`.
  num_heads: int, default 0 (= the json's `nheads`, else 4).
  image_size: int, default 0 (= the json's `img_size`, else 32 x the table's side, else 448).
  prefix: str, default "module."; stripped from every key that has it.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph import models
from mlgraph.convert import core, torch_transformer, torchvision_resnet
from mlgraph.models import q2l

OPTIONS = {"config": "", "num_heads": 0, "image_size": 0, "prefix": "module."}
# The official run's config file, found beside the checkpoint or one folder up without the
# option (mlgraph.convert.convert_file).
CONFIG_FILES = ("config_new.json",)
CONFIG_OPTION = "config"
IGNORED = [r".*num_batches_tracked", r"backbone\.1\.pe"]
BACKBONE = "backbone.0.body."
POSITION_TABLE = "backbone.1.pe"
DEFAULT_IMAGE_SIZE = 448
REQUIRED = ("query_embed.weight", "fc.W", "fc.b", "transformer.decoder.norm.weight")


def read_config_json(path: str | pathlib.Path) -> dict[str, Any]:
    """The released `config_new.json` (the argparse namespace of the training run) as a dict.

    Raises:
      ConversionError: a missing file, or one that is not a JSON object.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise core.ConversionError(f"option config={path}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise core.ConversionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise core.ConversionError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _layer_indices(state_dict: Mapping[str, np.ndarray], stack: str) -> list[int]:
    pattern = re.compile(rf"transformer\.{stack}\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    indices = sorted(found)
    if indices != list(range(len(indices))):
        raise core.ConversionError(
            f"transformer.{stack}.layers has indices {indices}; expected 0..{len(indices) - 1}"
        )
    return indices


def _require_resnet(state_dict) -> None:
    """Raise ConversionError unless the backbone is a torchvision ResNet (the one ported)."""
    if f"{BACKBONE}conv1.weight" not in state_dict:
        found = sorted({".".join(k.split(".")[:4]) for k in state_dict if k.startswith("backbone")})
        raise core.ConversionError(
            f"no '{BACKBONE}conv1.weight': only ResNet backbones are supported (TResNet, Swin "
            f"and CvT are not ported); backbone keys start with {', '.join(found[:3]) or '-'}"
        )


def _transformer_layers(state_dict, shape) -> tuple[list[int], list[int], bool, bool]:
    """(encoder layer indices, decoder layer indices, whether decoder layer 0 keeps its
    self-attention, whether the others do).

    Raises:
      ConversionError: no decoder, or decoder layers 1.. that disagree on self-attention.
    """
    enc = _layer_indices(state_dict, "encoder")
    dec = _layer_indices(state_dict, "decoder")
    if not dec:
        raise core.ConversionError("no transformer.decoder.layers.* keys")
    has_self = [f"transformer.decoder.layers.{i}.self_attn.in_proj_weight" in shape for i in dec]
    if len(set(has_self[1:])) > 1:
        raise core.ConversionError(
            "decoder layers 1.. disagree on self-attention (present in layers "
            f"{[i for i in dec[1:] if has_self[i]]}); the official code keeps all or none"
        )
    return enc, dec, has_self[0], bool(has_self[1]) if len(dec) > 1 else False


def _check_ported(r: core.SettingsResolver, config: str) -> None:
    """Refuse a config_new.json asking for parts that are not ported.

    Raises:
      ConversionError: pre_norm, or a position embedding other than 'sine'.
    """
    if r.get("pre_norm", bool):
        raise core.ConversionError(
            f"{config}: pre_norm: true is not supported (only the post-norm layers of the "
            "released models are ported)"
        )
    position_embedding = r.get("position_embedding", str)
    if position_embedding not in (None, "sine"):
        raise core.ConversionError(
            f"{config}: position_embedding: {position_embedding!r}; only 'sine' is ported"
        )


def infer_settings(
    state_dict: Mapping[str, np.ndarray],
    *,
    config: str = "",
    num_heads: int = 0,
    image_size: int = 0,
) -> dict[str, Any]:
    """The weights-checkpoint settings of a Query2Label state dict (keys without `module.`).

    Returns {"kind": "model", "model": {config.model fields}, "num_classes": K,
    "image_size": S, "assumed": {each field set from a default, not from the weights, an
    option or the json: the value it was given}}.

    Raises:
      ConversionError: missing keys, a non-ResNet backbone, inconsistent shapes, or a json
        that contradicts the weights or asks for what is not implemented (pre_norm).
    """
    core.require_keys(state_dict, REQUIRED, "a Query2Label")
    _require_resnet(state_dict)
    shape = {k: tuple(v.shape) for k, v in state_dict.items()}
    k, d = shape["query_embed.weight"]
    if shape["fc.W"] != (1, k, d) or shape["fc.b"] != (1, k):
        raise core.ConversionError(
            f"fc.W {shape['fc.W']} / fc.b {shape['fc.b']}: expected (1, {k}, {d}) / (1, {k}) "
            f"from query_embed.weight {shape['query_embed.weight']}"
        )
    enc, dec, keep_first, keep_other = _transformer_layers(state_dict, shape)
    ffn = shape["transformer.decoder.layers.0.linear1.weight"][0]
    keep_input_proj = "input_proj.weight" in shape
    backbone, backbone_kwargs = torchvision_resnet.trunk_settings(
        core.select_prefix(state_dict, BACKBONE)
    )

    # Settings the weights and the json leave open: Query2Label's field defaults.
    r = core.SettingsResolver(config, read_config_json, defaults=models.field_defaults("q2l"))
    checks = dict(num_class=k, hidden_dim=d, dim_feedforward=ffn, enc_layers=len(enc))
    checks |= dict(dec_layers=len(dec), keep_input_proj=keep_input_proj)
    checks["keep_first_self_attn_dec"] = keep_first
    if len(dec) > 1:
        checks["keep_other_self_attn_dec"] = keep_other
    for field, value in checks.items():
        r.check(field, type(value), value)
    _check_ported(r, config)

    heads = r.from_file("nheads", int, "num_heads", option=num_heads or None)
    if heads <= 0 or d % heads:
        raise core.ConversionError(f"num_heads {heads!r} does not divide hidden_dim {d}")
    size = r.first(
        "image_size",
        image_size or None,
        r.get("img_size", int) or None,
        32 * shape[POSITION_TABLE][-1] if POSITION_TABLE in shape else None,
        default=DEFAULT_IMAGE_SIZE,
    )

    model = {
        "name": "q2l",
        "backbone": backbone,
        "backbone_kwargs": backbone_kwargs,
        "hidden_dim": int(d),
        "num_heads": int(heads),
        "ffn_dim": int(ffn),
        "enc_layers": len(enc),
        "dec_layers": len(dec),
        "keep_input_proj": keep_input_proj,
        "keep_first_self_attn_dec": keep_first,
        "keep_other_self_attn_dec": keep_other,
    }
    # The training run's regularisation and loss, where the json has them; not listed as
    # assumed otherwise, since they do not change what the weights compute.
    found = {key: r.get(key, float) for key in ("dropout", "gamma_neg", "gamma_pos")}
    found = {key: value for key, value in found.items() if value is not None}
    build = {key: found[key] for key in ("dropout",) if key in found}
    loss = {key: found[key] for key in ("gamma_neg", "gamma_pos") if key in found}
    return core.model_settings(
        model, build, num_classes=int(k), image_size=size, loss=loss, assumed=r.assumed
    )


def table(module: q2l.Query2Label, prefix: str = "") -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every variable of `module`."""
    p = prefix
    sub = torchvision_resnet.table(module.backbone, prefix=f"{p}{BACKBONE}")
    t: dict[str, tuple[str, core.Transform]] = {f"backbone/{k}": v for k, v in sub.items()}
    if module.input_proj is not None:
        # A 1x1 conv (D, C, 1, 1) applied to tokens is a Linear with kernel (C, D).
        t["input_proj/kernel"] = (f"{p}input_proj.weight", lambda w: w[:, :, 0, 0].T)
        t["input_proj/bias"] = (f"{p}input_proj.bias", core.identity)
    for i in range(len(module.encoder)):
        t |= torch_transformer.encoder_layer(f"encoder/{i}", f"{p}transformer.encoder.layers.{i}")
    for i, layer in enumerate(module.decoder):
        t |= torch_transformer.decoder_layer(
            f"decoder/{i}",
            f"{p}transformer.decoder.layers.{i}",
            self_attn=layer.self_attn is not None,
        )
    t |= core.layer_norm("decoder_norm", f"{p}transformer.decoder.norm")
    t["query_embed"] = (f"{p}query_embed.weight", core.identity)
    t["fc/weight"] = (f"{p}fc.W", lambda w: w[0])
    t["fc/bias"] = (f"{p}fc.b", lambda b: b[0])
    return t


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the Query2Label that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = core.strip_prefix(state_dict, opts["prefix"])
    settings = infer_settings(
        state_dict,
        config=opts["config"],
        num_heads=opts["num_heads"],
        image_size=opts["image_size"],
    )
    model = settings["model"]
    if POSITION_TABLE in state_dict:
        pe = np.asarray(state_dict[POSITION_TABLE])
        # The table is tied to the training size; it is checked at its own size, and the model
        # recomputes it for whatever size it runs at.
        torch_transformer.check_position_table(
            pe, model["hidden_dim"], 32 * pe.shape[-1], POSITION_TABLE
        )
    module = core.build_abstract(settings, "Query2Label")
    core.load_into(module, state_dict, table(module), ignored=IGNORED, source="Query2Label")
    return module, settings

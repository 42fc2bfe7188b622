"""Official SALGL checkpoint (`experiments/.../checkpoints/ema_best_model.pth`) -> `models.salgl`.

The file is a `ModelEma.state_dict()`: every key starts with `module.` (salgl.md §7.2). Settings
are read from the shapes (salgl.md §3.3): K from `comatrix`, C and D from `classifier.weight`,
E from `embeddings`, outmess from the width of `ggnn.fc1_w.weight` (2D), T > 0 from the width
of `fc.0.weight` (2D), pos from the presence of `position_embedding.pe`, the encoder FFN width
and the attention width from their Linears, and the backbone from the key layout (a torchvision
ResNet by its blocks per stage, a timm ViT by `patch_embed`).

What the weights cannot tell is taken from the experiment's `config.yaml` when given (option
`config_yaml`): the number of GGNN steps, normalize / ignore_self / soft, the image size, the
embedding type and the loss fields; values the yaml also implies by shape (num_scenes,
num_classes, outmess, pos, backbone) are checked against the weights. Without a yaml these take
the `models.salgl` defaults and are listed under `settings["assumed"]`.

Options:
  num_steps: int, default -1 (= from config.yaml, else 3); GGNN steps T when T > 0.
  config_yaml: str, default ""; the experiment's `config.yaml`.
  image_size: int, default 0 (= config.yaml `img_size`, else the size implied by the position
    table or the ViT grid, else 448).
  num_heads: int, default 0; ViT backbone heads when the width is not a standard one.
  prefix: str, default "module."; stripped from every key that has it.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core, timm_vit, torch_transformer, torchvision_resnet
from mlgraph.convert.torchvision_resnet import check_options
from mlgraph.models import salgl

OPTIONS = {"num_steps": -1, "config_yaml": "", "image_size": 0, "num_heads": 0, "prefix": "module."}
IGNORED = [r".*num_batches_tracked", r"position_embedding\.pe"]
DEFAULT_IMAGE_SIZE = 448
DEFAULT_NUM_STEPS = 3
# Official backbone names (config.yaml `backbone`) -> registry names.
OFFICIAL_BACKBONES = {
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
    "vit_base_patch16_224": "vit_b16",
    "vit_base_patch16_224_in21k": "vit_b16",
    "vit_large_patch16_224": "vit_l16",
    "vit_large_patch16_224_in21k": "vit_l16",
}
# Head keys that must be present (without the prefix).
REQUIRED = (
    "embeddings",
    "comatrix",
    "classifier.weight",
    "scene_linear.weight",
    "fc.0.weight",
    "ggnn.fc1_w.weight",
    "attention.linear1.weight",
    "tb.layers.0.self_attn.in_proj_weight",
    "tb.layers.0.linear1.weight",
)


# ---------------------------------------------------------------------------------------------
# config.yaml
# ---------------------------------------------------------------------------------------------
def _scalar(text: str) -> Any:
    """A config.yaml value as Python: None, bool, int, float, or the string itself.

    The official code writes `key: str(value)` lines, so None is the string 'None' and numbers
    such as 5e-05 are not YAML floats; both are recognised here.
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("none", "null", "~", ""):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def read_config_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Parse an official experiment `config.yaml` (one `key: value` a line) into a dict.

    Raises:
      ConversionError: the file is missing or has a line that is not `key: value`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise core.ConversionError(f"option config_yaml={path}: no such file")
    out: dict[str, Any] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or key != key.strip():
            raise core.ConversionError(
                f"{path}:{number}: expected a top-level 'key: value' line, got {line!r}"
            )
        out[key.strip()] = _scalar(value)
    return out


def _typed(cfg: Mapping[str, Any], key: str, kind: type, path: str) -> Any:
    """cfg[key] converted to `kind` (bool, int, float, str); None when absent or 'None'."""
    value = cfg.get(key)
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        return str(value)
    raise core.ConversionError(f"{path}: {key}: {value!r} is not a {kind.__name__}")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
def _sub(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def infer_backbone(
    state_dict: Mapping[str, np.ndarray], *, num_heads: int = 0
) -> tuple[str, dict[str, Any], int | None]:
    """(registry name, backbone_kwargs, image size implied by the weights or None).

    A ResNet whose block layout is not 50/101/152 is reported as 'resnet50' with a `layers`
    override (and `width` when the stem is not 64 wide); a ViT of non-standard size as
    'vit_b16' with explicit sizes.
    """
    sub = _sub(state_dict, "backbone.")
    if "conv1.weight" in sub:
        rs = torchvision_resnet.infer_settings(sub, include_head=False)
        kwargs: dict[str, Any] = {}
        if "layers" in rs:
            kwargs["layers"] = list(rs["layers"])
        if rs["width"] != 64:
            kwargs["width"] = rs["width"]
        return rs["backbone"], kwargs, None
    if "patch_embed.proj.weight" in sub:
        vs = timm_vit.infer_settings(sub, include_head=False, num_heads=num_heads)
        if vs["backbone"] is not None:
            return vs["backbone"], {}, vs["image_size"]
        kwargs = {k: vs[k] for k in ("width", "depth", "num_heads", "patch_size")}
        if vs["mlp_ratio"] != 4.0:
            kwargs["mlp_ratio"] = vs["mlp_ratio"]
        return "vit_b16", kwargs, vs["image_size"]
    raise core.ConversionError(
        "no 'backbone.conv1.weight' (torchvision ResNet) or 'backbone.patch_embed.proj.weight' "
        "(timm ViT): unsupported SALGL backbone"
    )


def infer_settings(
    state_dict: Mapping[str, np.ndarray],
    *,
    num_steps: int = -1,
    config_yaml: str = "",
    image_size: int = 0,
    num_heads: int = 0,
) -> dict[str, Any]:
    """The weights checkpoint settings of a SALGL state dict (keys without `module.`).

    Returns {"kind": "model", "model": {config.model fields}, "num_classes": C,
    "image_size": S, "assumed": [fields set from defaults, not from the file or the yaml]}.

    Raises:
      ConversionError: missing head keys, inconsistent shapes, or a config.yaml that
        contradicts the weights.
    """
    missing = [k for k in REQUIRED if k not in state_dict]
    if missing:
        raise core.ConversionError(
            f"not a SALGL state dict: missing {', '.join(missing)} "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    shape = {k: tuple(v.shape) for k, v in state_dict.items()}
    c, d = shape["classifier.weight"]
    k = shape["comatrix"][0]
    if shape["comatrix"] != (k, c, c):
        raise core.ConversionError(
            f"comatrix has shape {shape['comatrix']}; expected (K, {c}, {c})"
        )
    if shape["embeddings"][0] != c:
        raise core.ConversionError(f"embeddings has shape {shape['embeddings']}; expected ({c}, E)")
    e = shape["embeddings"][1]
    outmess = shape["ggnn.fc1_w.weight"][1] == 2 * d
    has_steps = shape["fc.0.weight"][1] == 2 * d
    pos = "position_embedding.pe" in state_dict
    backbone, backbone_kwargs, weights_size = infer_backbone(state_dict, num_heads=num_heads)
    if pos and "vit" in backbone:
        raise core.ConversionError("position_embedding.pe with a ViT backbone is not supported")

    yaml_path = config_yaml
    cfg = read_config_yaml(config_yaml) if config_yaml else {}
    assumed: list[str] = []

    def from_yaml(key: str, kind: type, field: str) -> Any:
        value = _typed(cfg, key, kind, yaml_path)
        if value is None:
            assumed.append(field)
            return salgl.DEFAULTS[field]
        return value

    def check(key: str, kind: type, implied: Any) -> None:
        value = _typed(cfg, key, kind, yaml_path)
        if value is not None and value != implied:
            raise core.ConversionError(
                f"{yaml_path}: {key}: {value!r}, but the weights imply {implied!r}"
            )

    check("num_scenes", int, k)
    check("num_classes", int, c)
    check("outmess", bool, outmess)
    check("pos", bool, pos)
    official = _typed(cfg, "backbone", str, yaml_path)
    if official is not None and OFFICIAL_BACKBONES.get(official, backbone) != backbone:
        raise core.ConversionError(
            f"{yaml_path}: backbone: {official!r}, but the weights are a {backbone}"
        )

    if not has_steps:
        steps = 0
        if num_steps > 0:
            raise core.ConversionError(
                f"option num_steps={num_steps}, but fc.0.weight {shape['fc.0.weight']} has no "
                "GGNN half (the checkpoint was trained with num_steps=0)"
            )
    elif num_steps > 0:
        steps = num_steps
    else:
        steps = _typed(cfg, "num_steps", int, yaml_path)
        if steps is None:
            steps = DEFAULT_NUM_STEPS
            assumed.append("num_steps")
        elif steps <= 0:
            raise core.ConversionError(
                f"{yaml_path}: num_steps: {steps}, but fc.0.weight {shape['fc.0.weight']} has a "
                "GGNN half (num_steps > 0)"
            )

    size = image_size or _typed(cfg, "img_size", int, yaml_path)
    if not size and pos:
        size = 32 * shape["position_embedding.pe"][-1]
    if not size:
        size = weights_size
    if not size:
        size = DEFAULT_IMAGE_SIZE
        assumed.append("image_size")

    embed_type = _typed(cfg, "embed_type", str, yaml_path)
    if embed_type is None:
        assumed.append("embed_type")
    model = {
        "name": "salgl",
        "backbone": backbone,
        "backbone_kwargs": backbone_kwargs,
        "num_scenes": k,
        "num_steps": steps,
        "outmess": outmess,
        "normalize": from_yaml("normalize", bool, "normalize"),
        "ignore_self": from_yaml("ignore_self", bool, "ignore_self"),
        "soft": from_yaml("soft", bool, "soft"),
        "pos": pos,
        # A checkpoint carries its own embeddings, so file tables become 'checkpoint' buffers.
        "embed_type": "random" if embed_type == "random" else "checkpoint",
        "embed_path": "",
        "embed_dim": e,
        "att_dim": shape["attention.linear1.weight"][0],
        "ffn_dim": shape["tb.layers.0.linear1.weight"][0],
        "heads": salgl.DEFAULTS["heads"],
        "dropout": salgl.DEFAULTS["dropout"],
        "loss": from_yaml("loss", str, "loss"),
        "gamma_pos": from_yaml("gamma_pos", float, "gamma_pos"),
        "gamma_neg": from_yaml("gamma_neg", float, "gamma_neg"),
        "clip": from_yaml("clip", float, "clip"),
        "lamda": from_yaml("lamda", float, "lamda"),
        "comat_ema": from_yaml("comat_ema", bool, "comat_ema"),
    }
    return {
        "kind": "model",
        "model": model,
        "num_classes": c,
        "image_size": int(size),
        "assumed": sorted(assumed),
    }


# ---------------------------------------------------------------------------------------------
# Table and conversion
# ---------------------------------------------------------------------------------------------
def table(module: salgl.SALGL, prefix: str = "") -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (torch key, transform) for every variable of `module`.

    `prefix` is prepended to every torch key (e.g. "module." for the raw checkpoint).
    """
    p = prefix
    backbone = module.backbone
    if hasattr(backbone, "layer1"):
        sub = torchvision_resnet.table(backbone, prefix=f"{p}backbone.")
    else:
        sub = timm_vit.table(backbone, prefix=f"{p}backbone.")
    t: dict[str, tuple[str, core.Transform]] = {f"backbone/{k}": v for k, v in sub.items()}
    t["embeddings"] = (f"{p}embeddings", core.identity)
    t["comatrix"] = (f"{p}comatrix", core.identity)
    t |= torch_transformer.encoder_layer("tb", f"{p}tb.layers.0")
    t |= core.linear("scene_linear", f"{p}scene_linear", bias=False)
    for gate in ("fc1_w", "fc1_u", "fc2_w", "fc2_u", "fc3_w", "fc3_u"):
        t |= core.linear(f"ggnn/{gate}", f"{p}ggnn.{gate}")
    t |= core.linear("attention/linear1", f"{p}attention.linear1", bias=False)
    t |= core.linear("attention/linear2", f"{p}attention.linear2", bias=False)
    t |= core.linear("attention/hidden_linear", f"{p}attention.hidden_linear")
    t |= core.linear("attention/target_linear", f"{p}attention.target_linear")
    t |= core.linear("fc", f"{p}fc.0")
    t["classifier/weight"] = (f"{p}classifier.weight", core.identity)
    t["classifier/bias"] = (f"{p}classifier.bias", core.identity)
    return t


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the SALGL that `state_dict` describes and fill it; returns (module, settings)."""
    opts = check_options(options, OPTIONS)
    if opts["prefix"]:
        state_dict = core.strip_prefix(state_dict, opts["prefix"])
    settings = infer_settings(
        state_dict,
        num_steps=opts["num_steps"],
        config_yaml=opts["config_yaml"],
        image_size=opts["image_size"],
        num_heads=opts["num_heads"],
    )
    model = settings["model"]
    d = int(state_dict["classifier.weight"].shape[1])
    if model["pos"]:
        torch_transformer.check_position_table(
            np.asarray(state_dict["position_embedding.pe"]),
            d,
            settings["image_size"],
            "position_embedding.pe",
        )
    module = core.build_abstract(salgl.build, settings, "SALGL")
    core.load_into(module, state_dict, table(module), ignored=IGNORED, source="SALGL")
    return module, settings

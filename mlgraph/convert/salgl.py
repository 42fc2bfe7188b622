"""Official SALGL checkpoint (`experiments/.../checkpoints/ema_best_model.pth`) -> `models.salgl`.

The file is a `ModelEma.state_dict()`: every key starts with `module.` (docs/salgl.md §7.2).
Settings are read from the shapes (docs/salgl.md §3.3): K from `comatrix`, C and D from
`classifier.weight`, E from `embeddings`, outmess from the width of `ggnn.fc1_w.weight` (2D),
T > 0 from the width of `fc.0.weight` (2D), pos from the presence of `position_embedding.pe`, the
encoder FFN width and the attention width from their Linears, and the backbone from the key
layout (a torchvision ResNet by its blocks per stage, a timm ViT by `patch_embed`).

What the weights cannot tell is taken from the experiment's `config.yaml` (option
`config_yaml`; without it, the file beside the checkpoint or in the experiment folder above
`checkpoints/` is used): the number of GGNN steps, normalize / ignore_self / soft, the image
size, the embedding type and the loss fields; values the yaml also implies by shape
(num_scenes, num_classes, outmess, pos, backbone) are checked against the weights. Without a
yaml these take the `models.salgl` defaults, are listed under `settings["assumed"]` and named in
a warning line (`--strict`: an error).

Options:
  num_steps: int, default -1 (= from config.yaml, else 3); GGNN steps T when T > 0.
  config_yaml: str, default "" (= `config.yaml` beside the checkpoint or one folder up); the
    experiment's `config.yaml`.
  image_size: int, default 0 (= config.yaml `img_size`, else the size implied by the position
    table or the ViT grid, else 448).
  num_heads: int, default 0; ViT backbone heads when the width is not a standard one.
  prefix: str, default "module."; stripped from every key that has it.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import yaml
from flax import nnx

from mlgraph import models
from mlgraph.convert import core, timm_vit, torch_transformer, torchvision_resnet
from mlgraph.models import salgl

OPTIONS = {"num_steps": -1, "config_yaml": "", "image_size": 0, "num_heads": 0, "prefix": "module."}
# The official run's config file, found beside the checkpoint or one folder up without the
# option (mlgraph.convert.convert_file).
CONFIG_FILES = ("config.yaml",)
CONFIG_OPTION = "config_yaml"
IGNORED = [r".*num_batches_tracked", r"position_embedding\.pe"]
DEFAULT_IMAGE_SIZE = 448
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
def _official_value(text: str, node: yaml.Node) -> Any:
    """A config.yaml value as Python, from its YAML node and its text.

    The official code wrote every line as `f"{key}: {str(value)}"`, so a value is the Python
    literal of what was saved whenever it reads as one (`None`, `5e-05`, `(1, 2)`), where YAML
    would give the strings 'None' and '5e-05'; any other value is what YAML reads.
    """
    source = text[node.start_mark.index : node.end_mark.index]
    if not (isinstance(node, yaml.ScalarNode) and node.style):  # quoted scalars stay strings
        try:
            return ast.literal_eval(source)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return yaml.safe_load(source)


def read_config_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Parse an official experiment `config.yaml` (one top-level `key: value` a line) into a dict.

    Raises:
      ConversionError: the file is missing, is not YAML, or has a line that is not a top-level
        `key: value` (an indented continuation, a nested block).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise core.ConversionError(f"option config_yaml={path}: no such file")
    text = path.read_text()
    lines = text.splitlines()

    def not_flat(line: int) -> core.ConversionError:
        got = lines[line] if line < len(lines) else ""
        return core.ConversionError(
            f"{path}:{line + 1}: expected a top-level 'key: value' line, got {got!r}"
        )

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.context_mark or e.problem_mark
        raise not_flat(mark.line if mark else 0) from e
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise not_flat(root.start_mark.line)
    out: dict[str, Any] = {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line
        if not isinstance(key_node, yaml.ScalarNode) or key_node.start_mark.column:
            raise not_flat(line)
        # A value must end on its key's line: str(value) never spans lines, so anything more is
        # an indented continuation or a nested block.
        if value_node.end_mark.line > line:
            extra = max(value_node.start_mark.line, line + 1)
            while extra < len(lines) and not lines[extra].strip():
                extra += 1
            raise not_flat(extra)
        out[key_node.value] = _official_value(text, value_node)
    return out


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
def infer_backbone(
    state_dict: Mapping[str, np.ndarray], *, num_heads: int = 0
) -> tuple[str, dict[str, Any], int | None, dict[str, Any]]:
    """(registry name, backbone_kwargs, image size implied by the weights or None, what was
    assumed: {"num_heads": n} for a ViT of non-standard width without the option num_heads).

    A ResNet whose block layout is not 50/101/152 is reported as 'resnet50' with a `layers`
    override (and `width` when the stem is not 64 wide); a ViT of non-standard size as
    'vit_b16' with explicit sizes.
    """
    sub = core.select_prefix(state_dict, "backbone.", required=False)
    if "conv1.weight" in sub:
        return *torchvision_resnet.trunk_settings(sub), None, {}
    if "patch_embed.proj.weight" in sub:
        vs = timm_vit.infer_settings(sub, include_head=False, num_heads=num_heads)
        assumed = vs.get("assumed", {})
        if vs["backbone"] is not None:
            return vs["backbone"], {}, vs["image_size"], assumed
        kwargs = {k: vs[k] for k in ("width", "depth", "num_heads", "patch_size")}
        if vs["mlp_ratio"] != 4.0:
            kwargs["mlp_ratio"] = vs["mlp_ratio"]
        return "vit_b16", kwargs, vs["image_size"], assumed
    raise core.ConversionError(
        "no 'backbone.conv1.weight' (torchvision ResNet) or 'backbone.patch_embed.proj.weight' "
        "(timm ViT): unsupported SALGL backbone"
    )


# The config.yaml fields of the training objective -> SALGL's Loss fields (the yaml names the
# loss `loss`).
LOSS_FIELDS = {
    "loss": "name",
    "gamma_pos": "gamma_pos",
    "gamma_neg": "gamma_neg",
    "clip": "clip",
    "lamda": "lamda",
}


def _head_sizes(shape: Mapping[str, tuple]) -> tuple[int, int, int, int]:
    """(C, D, K, E) from the head's shapes, checked against each other.

    Raises:
      ConversionError: a comatrix or embedding table of another shape.
    """
    c, d = shape["classifier.weight"]
    k = shape["comatrix"][0]
    if shape["comatrix"] != (k, c, c):
        raise core.ConversionError(
            f"comatrix has shape {shape['comatrix']}; expected (K, {c}, {c})"
        )
    if shape["embeddings"][0] != c:
        raise core.ConversionError(f"embeddings has shape {shape['embeddings']}; expected ({c}, E)")
    return c, d, k, shape["embeddings"][1]


def _ggnn_steps(r, fc_shape: tuple, has_steps: bool, num_steps: int, config_yaml: str) -> int:
    """The GGNN steps T: 0 when `fc.0` has no GGNN half, else the yaml's or the option's.

    Raises:
      ConversionError: an option or a yaml value the weights contradict.
    """
    if not has_steps:
        if num_steps > 0:
            raise core.ConversionError(
                f"option num_steps={num_steps}, but fc.0.weight {fc_shape} has no GGNN half "
                "(the checkpoint was trained with num_steps=0)"
            )
        return 0
    steps = r.from_file("num_steps", int, option=num_steps if num_steps > 0 else None)
    if steps <= 0:
        raise core.ConversionError(
            f"{config_yaml}: num_steps: {steps}, but fc.0.weight {fc_shape} has a GGNN half "
            "(num_steps > 0)"
        )
    return steps


def _check_yaml(r: core.SettingsResolver, **from_weights) -> None:
    """Each config.yaml field of `from_weights` must equal what the weights say.

    Raises:
      ConversionError: a field the yaml sets otherwise.
    """
    for field, value in from_weights.items():
        r.check(field, type(value), value)


def infer_settings(
    state_dict: Mapping[str, np.ndarray],
    *,
    num_steps: int = -1,
    config_yaml: str = "",
    image_size: int = 0,
    num_heads: int = 0,
) -> dict[str, Any]:
    """The weights checkpoint settings of a SALGL state dict (keys without `module.`).

    Returns {"kind": "model", "model": {the config.model fields the weights and yaml fix},
    "build": {fields that only build the target}, "loss": {config.loss fields}, "num_classes":
    C, "image_size": S, "assumed": {each field set from a default, not from the weights, an
    option or the yaml: the value it was given}}.

    Raises:
      ConversionError: missing head keys, inconsistent shapes, or a config.yaml that
        contradicts the weights.
    """
    core.require_keys(state_dict, REQUIRED, "a SALGL")
    shape = {k: tuple(v.shape) for k, v in state_dict.items()}
    c, d, k, e = _head_sizes(shape)
    outmess = shape["ggnn.fc1_w.weight"][1] == 2 * d
    has_steps = shape["fc.0.weight"][1] == 2 * d
    pos = "position_embedding.pe" in state_dict
    backbone, backbone_kwargs, weights_size, backbone_assumed = infer_backbone(
        state_dict, num_heads=num_heads
    )
    if pos and "vit" in backbone:
        raise core.ConversionError("position_embedding.pe with a ViT backbone is not supported")

    # Settings the weights and the yaml leave open: SALGL's field defaults and its loss's
    # (`models.salgl.Loss`; the yaml spells the loss's name `loss`).
    loss_defaults = models.loss_defaults("salgl")
    defaults = models.field_defaults("salgl") | {"loss": loss_defaults.pop("name")} | loss_defaults
    r = core.SettingsResolver(config_yaml, read_config_yaml, defaults=defaults)
    _check_yaml(r, num_scenes=k, num_classes=c, outmess=outmess, pos=pos)
    official = r.get("backbone", str)
    if official is not None and OFFICIAL_BACKBONES.get(official, backbone) != backbone:
        raise core.ConversionError(
            f"{config_yaml}: backbone: {official!r}, but the weights are a {backbone}"
        )
    steps = _ggnn_steps(r, shape["fc.0.weight"], has_steps, num_steps, config_yaml)
    size = r.first(
        "image_size",
        image_size or None,
        r.get("img_size", int) or None,
        32 * shape["position_embedding.pe"][-1] if pos else None,
        weights_size,
        default=DEFAULT_IMAGE_SIZE,
    )
    # Only 'random' matters (a trainable [C, D] table); without a yaml, get_args' 'bert', which
    # is what `assumed` lists (the build field below is 'checkpoint' for any file type).
    embed_type = r.first("embed_type", r.get("embed_type", str), default="bert")
    model = {
        "name": "salgl",
        "backbone": backbone,
        "backbone_kwargs": backbone_kwargs,
        "num_scenes": k,
        "num_steps": steps,
        "outmess": outmess,
        "normalize": r.from_file("normalize", bool),
        "ignore_self": r.from_file("ignore_self", bool),
        "soft": r.from_file("soft", bool),
        "pos": pos,
        "att_dim": shape["attention.linear1.weight"][0],
        "ffn_dim": shape["tb.layers.0.linear1.weight"][0],
        "heads": r.defaults["heads"],
    }
    build = {
        # A checkpoint carries its own embeddings, so file tables become 'checkpoint' buffers.
        "embed_type": "random" if embed_type == "random" else "checkpoint",
        "embed_path": "",
        "embed_dim": e,
        # Training-only settings of the run, for the record (they change no output).
        "dropout": r.defaults["dropout"],
        "comat_ema": r.from_file("comat_ema", bool),
    }
    loss = {LOSS_FIELDS[key]: r.from_file(key, type(r.defaults[key])) for key in LOSS_FIELDS}
    return core.model_settings(
        model,
        build,
        num_classes=c,
        image_size=size,
        loss=loss,
        assumed=r.assumed | backbone_assumed,
    )


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
    opts = core.check_options(options, OPTIONS)
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
    module = core.build_abstract(settings, "SALGL")
    core.load_into(module, state_dict, table(module), ignored=IGNORED, source="SALGL")
    return module, settings

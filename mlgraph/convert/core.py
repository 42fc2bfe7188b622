"""The conversion machinery shared by every source table: PyTorch state dict -> NNX module.

A mapping table is a dict from an NNX variable path ("layer1/0/conv1/kernel") to a pair
(torch key, transform). `load_into` applies a table to a module and accounts for every key on
both sides: torch keys neither mapped nor ignored, table entries whose torch key is absent,
NNX variables the table leaves unset, and shape mismatches are all collected into one
`ConversionError` that lists them.

Also here, once for every source: option checking (`check_options`), key prefixes
(`strip_prefix`, `select_prefix`, `detect_prefix`), required keys (`require_keys`), batch-norm
table rows (`bn_entries`), the settings resolver of the method converters
(`SettingsResolver`), and the converted model back from its weights checkpoint
(`load_converted`).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]
Table = Mapping[str, tuple[str, Transform]]


class ConversionError(ValueError):
    """A state dict does not fit a model: lists every missing, unexpected and mis-shaped key."""


def identity(w: np.ndarray) -> np.ndarray:
    """Copy a tensor unchanged (biases, norms, embeddings)."""
    return w


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> NNX Linear kernel (in, out)."""
    return w.T


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (O, I, kh, kw) -> NNX Conv kernel (kh, kw, I, O); depthwise too."""
    return w.transpose(2, 3, 1, 0)


def linear(path: str, key: str, bias: bool = True) -> dict[str, tuple[str, Transform]]:
    """Entries for a torch `nn.Linear` at `key` -> the `nnx.Linear` at NNX `path`."""
    t = {f"{path}/kernel": (f"{key}.weight", linear_kernel)}
    if bias:
        t[f"{path}/bias"] = (f"{key}.bias", identity)
    return t


def layer_norm(path: str, key: str) -> dict[str, tuple[str, Transform]]:
    """Entries for a torch `nn.LayerNorm` at `key` -> the `nnx.LayerNorm` at `path`."""
    return {f"{path}/scale": (f"{key}.weight", identity), f"{path}/bias": (f"{key}.bias", identity)}


def variable_paths(module: nnx.Module) -> dict[str, nnx.Variable]:
    """All NNX variables of `module` keyed by their '/'-joined path."""
    flat = nnx.to_flat_state(nnx.state(module))
    return {"/".join(str(p) for p in path): var for path, var in flat}


def to_numpy_state_dict(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Torch tensors (or arrays) -> float32/int numpy arrays; bfloat16 goes through float32."""
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
                value = value.float()
            value = value.numpy()
        out[key] = np.asarray(value)
    return out


def check_options(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `options` over `defaults`, rejecting unknown names and wrongly typed values."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConversionError(
            f"unknown options {', '.join(unknown)}; valid options: {', '.join(sorted(defaults))}"
        )
    merged = dict(defaults) | dict(options)
    for name, value in merged.items():
        want = type(defaults[name])
        if not isinstance(value, want):
            raise ConversionError(
                f"option {name}={value!r}: expected a {want.__name__}, got {type(value).__name__}"
            )
    return merged


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drop `prefix` from every key that has it (e.g. 'module.' from DDP/EMA checkpoints); the
    other keys are kept as they are."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def select_prefix(
    state_dict: Mapping[str, np.ndarray], prefix: str, *, required: bool = True
) -> dict[str, np.ndarray]:
    """The entries under `prefix`, with the prefix removed (all entries if `prefix` is empty),
    e.g. a backbone's keys inside a method checkpoint.

    Raises:
      ConversionError: no key starts with `prefix` (only when `required`).
    """
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if required and not out:
        raise ConversionError(f"no keys start with the prefix {prefix!r}")
    return out


def detect_prefix(state_dict: Mapping[str, np.ndarray], candidates: Sequence[str]) -> str:
    """The first of `candidates` that some key starts with, else "" (e.g. HF's 'bert.')."""
    return next((p for p in candidates if any(k.startswith(p) for k in state_dict)), "")


def require_keys(state_dict: Mapping[str, np.ndarray], keys: Iterable[str], what: str) -> None:
    """Fail early, with the file's first keys, when `state_dict` is not `what` ("a SALGL").

    Raises:
      ConversionError: 'not a SALGL state dict: missing ... (first keys: ...)'.
    """
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ConversionError(
            f"not {what} state dict: missing {', '.join(missing)} "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )


def head_count(
    width: int, num_heads: int, standard: Mapping[int, int], what: str = "width"
) -> tuple[int, dict[str, int]]:
    """The attention heads of a transformer of `width` and what was assumed for them: the
    option `num_heads` when given, else the count of the standard models of that width
    (`standard`), else width // 64, which no state dict can confirm and is then returned as
    assumed ({"num_heads": heads}).

    Raises:
      ConversionError: a count that does not divide `width` (the message names the option).
    """
    heads = num_heads or standard.get(width, width // 64)
    if heads <= 0 or width % heads:
        raise ConversionError(
            f"cannot split {what} {width} into {heads} heads; pass the option num_heads"
        )
    guessed = not num_heads and width not in standard
    return heads, {"num_heads": heads} if guessed else {}


def bn_entries(path: str, key: str) -> dict[str, tuple[str, Transform]]:
    """Table rows of one BatchNorm: NNX scale/bias/mean/var <- torch weight/bias/running_*."""
    return {
        f"{path}/scale": (f"{key}.weight", identity),
        f"{path}/bias": (f"{key}.bias", identity),
        f"{path}/mean": (f"{key}.running_mean", identity),
        f"{path}/var": (f"{key}.running_var", identity),
    }


class SettingsResolver:
    """The settings of a method checkpoint, each resolved in one order: an explicit option, else
    the official config file (SALGL's `config.yaml`, Query2Label's `config_new.json`), else a
    default, whose field is then listed in `assumed`; and the check that the config file agrees
    with what the weights imply.

    Args:
      path: the config file, "" for none (then every setting is an option or a default; a
        source whose official run writes no config file passes "").
      read: reads `path` into a flat {key: value} dict (needed only with a `path`).
      defaults: field -> the value taken when neither an option nor the file gives one.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        read: Callable[[str], Mapping[str, Any]] | None = None,
        *,
        defaults: Mapping[str, Any],
    ):
        self.path = str(path)
        self.config = dict(read(self.path)) if self.path and read else {}
        self.defaults = defaults
        self._assumed: dict[str, Any] = {}

    @property
    def assumed(self) -> dict[str, Any]:
        """The fields set from a default so far, each with the value it was given, sorted by
        field."""
        return dict(sorted(self._assumed.items()))

    def get(self, key: str, kind: type) -> Any:
        """The file's `key` as `kind` (bool, int, float, str); None when absent or null.

        Raises:
          ConversionError: a value that is not a `kind` (0/1 count as bools, whole floats as
            ints, ints as floats).
        """
        value = self.config.get(key)
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
        raise ConversionError(f"{self.path}: {key}: {value!r} is not a {kind.__name__}")

    def first(self, field: str, *values: Any, default: Any = None) -> Any:
        """The first of `values` that is not None (the caller lists them by precedence: option,
        file, what the weights imply); else `default` (`defaults[field]` unless given), and
        `field` is recorded as assumed, with that value."""
        for value in values:
            if value is not None:
                return value
        value = self.defaults[field] if default is None else default
        self._assumed[field] = value
        return value

    def from_file(self, key: str, kind: type, field: str | None = None, *, option=None) -> Any:
        """`option` unless None, else the file's `key` as `kind`, else the default of `field`
        (`key` when not given), recorded as assumed."""
        return self.first(field or key, option, self.get(key, kind))

    def check(self, key: str, kind: type, implied: Any) -> None:
        """Fail when the file has `key` and it differs from what the weights imply.

        Raises:
          ConversionError: '{path}: {key}: {value}, but the weights imply {implied}'.
        """
        value = self.get(key, kind)
        if value is not None and value != implied:
            raise ConversionError(
                f"{self.path}: {key}: {value!r}, but the weights imply {implied!r}"
            )


def model_settings(
    model: dict,
    build: dict,
    *,
    num_classes: int,
    image_size: int,
    assumed: Mapping[str, Any],
    **more: Any,
) -> dict[str, Any]:
    """The settings of a whole-model weights checkpoint: `model` (the config.model fields a
    config using it must match), `build` (how to build the conversion target), the class count
    and image size, `assumed` (each setting the conversion took from a default, with the value
    it took: `SettingsResolver.assumed`; {} when none) and `more` (e.g. `loss`, `notes`)."""
    return {
        "kind": "model",
        "model": model,
        "build": build,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "assumed": dict(assumed),
        **more,
    }


def build_fields(settings: Mapping) -> dict[str, Any]:
    """The `config.model` fields that rebuild a converted model: `settings["model"]` (the
    fields the weights or the official config fix, which a config using the checkpoint must
    match) with `settings["build"]` (fields that only say how to build the target, such as
    embeddings held as buffers instead of read from a file)."""
    return dict(settings["model"]) | dict(settings.get("build", {}))


def build_abstract(settings: Mapping, source: str) -> nnx.Module:
    """The model `build_fields(settings)` describes under `nnx.eval_shape`: shapes only, no
    random init, since every variable is then set from the checkpoint.

    Raises:
      ConversionError: the settings do not describe a buildable model (prefixed by `source`).
    """
    from mlgraph import models
    from mlgraph.errors import ConfigError

    try:
        return nnx.eval_shape(
            lambda: models.build(
                build_fields(settings),
                num_classes=settings["num_classes"],
                image_size=settings["image_size"],
                rngs=nnx.Rngs(0),
            )
        )
    except (ValueError, ConfigError) as e:
        raise ConversionError(f"{source}: {e}") from e


# Build fields naming the files a model's buffers are read from (word vectors, the graph): a
# converted checkpoint holds those buffers, whose values would replace what such a file gives.
FILLED_FROM_WEIGHTS = ("embed_path", "graph_path")


def with_overrides(settings: Mapping, fields: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`settings` with each of `fields` replacing the field of that name in its `build` section
    (where `build_fields` takes it from) or else in `model` (a new field joins `model`).

    Raises:
      ConversionError: a `FILLED_FROM_WEIGHTS` field given another value (the checkpoint's
        buffers would replace what it reads).
    """
    model, build = dict(settings["model"]), dict(settings.get("build", {}))
    for field, value in fields.items():
        section = build if field in build else model
        if field in FILLED_FROM_WEIGHTS and value != section.get(field):
            raise ConversionError(
                f"{source}: {field}={value!r} cannot be overridden: the checkpoint holds the "
                f"values that file would give (its settings.json has {field}="
                f"{section.get(field)!r}); leave it out, or convert again with the other file"
            )
        section[field] = value
    return dict(settings, model=model, build=build)


def load_converted(path: str | pathlib.Path, **fields: Any) -> nnx.Module:
    """The model a whole-model weights checkpoint of `mlgraph.convert.convert_file` describes,
    filled from it; `fields` replace the `config.model` fields of its settings (`model` or
    `build`, `with_overrides`) that change no weight, such as ML-GCN's `pool` or `dropout`.

    Raises:
      ConversionError: settings that describe no buildable model, an unknown field, a field
        whose value the checkpoint holds, or fields that change the model's variables (one
        line naming them).
    """
    from mlgraph import checkpointing

    tree, settings = checkpointing.load_weights(path)
    source = str(path)
    module = build_abstract(with_overrides(settings, fields, source), source)
    return _filled(module, tree, source, fields)


def _filled(module: nnx.Module, tree: Any, source: str, fields: Mapping[str, Any]) -> nnx.Module:
    """The abstract `module` with its variables set from `tree`, a converted checkpoint's
    arrays, each of which must have a variable of its shape.

    Raises:
      ConversionError: a variable the checkpoint lacks or has in another shape, or arrays the
        model has no variable for; naming `fields`, the overrides that built it so.
    """
    from mlgraph import checkpointing
    from mlgraph.errors import ConfigError

    changed = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    fix = (
        f"; overriding {changed} changes the model's variables: leave "
        f"{'it' if len(fields) == 1 else 'them'} out"
        if fields
        else "; convert the checkpoint again"
    )
    saved = {"/".join(map(str, p)) for p in nnx.traversals.flatten_mapping(tree)}
    unused = sorted(saved - set(variable_paths(module)))
    if unused:
        raise ConversionError(
            f"{source}: the model built has no variable for the checkpoint's "
            f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}{fix}"
        )
    graphdef, state = nnx.split(module)
    try:
        filled = checkpointing.fill_from(nnx.to_pure_dict(state), tree, "the checkpoint", source)
    except ConfigError as e:
        raise ConversionError(f"{e}{fix}") from None
    state.replace_by_pure_dict(filled)
    return nnx.merge(graphdef, state)


def load_into(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    table: Table,
    *,
    ignored: Iterable[str] = (),
    keep_init: Iterable[str] = (),
    source: str = "state dict",
) -> None:
    """Copy `state_dict` into `module` through `table`, checking every key and shape.

    Args:
      module: the NNX module to fill in place.
      state_dict: torch key -> numpy array.
      table: NNX path -> (torch key, transform).
      ignored: regexes (full match) of torch keys that are dropped on purpose
        (e.g. `num_batches_tracked`, a replaced classifier head).
      keep_init: regexes (full match) of NNX paths that keep their initial values.
      source: a name for the state dict in error messages (usually its file path).

    Raises:
      ConversionError: listing every problem found, before anything is written.
    """
    targets = variable_paths(module)
    ignored_re = [re.compile(p) for p in ignored]
    keep_re = [re.compile(p) for p in keep_init]

    missing, bad_shape, unknown_target = [], [], []
    values: dict[str, np.ndarray] = {}
    for path, (key, transform) in table.items():
        if path not in targets:
            unknown_target.append(path)
            continue
        if key not in state_dict:
            missing.append(key)
            continue
        value = np.asarray(transform(np.asarray(state_dict[key])))
        want = tuple(targets[path].shape)
        if value.shape != want:
            bad_shape.append(f"{key} {tuple(state_dict[key].shape)} -> {path} {want}")
            continue
        values[path] = value

    used = {key for key, _ in table.values()}
    unexpected = sorted(
        k for k in state_dict if k not in used and not any(r.fullmatch(k) for r in ignored_re)
    )
    unset = sorted(
        p for p in targets if p not in table and not any(r.fullmatch(p) for r in keep_re)
    )

    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shapes ({len(bad_shape)}): {'; '.join(bad_shape)}")
    if unset:
        problems.append(f"model variables not set ({len(unset)}): {', '.join(unset)}")
    if unknown_target:
        problems.append(
            f"table names variables the model lacks ({len(unknown_target)}): "
            f"{', '.join(sorted(unknown_target))}"
        )
    if problems:
        raise ConversionError(f"{source}: " + " | ".join(problems))

    for path, value in values.items():
        var = targets[path]
        var.set_value(np.asarray(value, dtype=var.dtype))

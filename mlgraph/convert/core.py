"""The conversion machinery shared by every source table: PyTorch state dict -> NNX module.

A mapping table is a dict from an NNX variable path ("layer1/0/conv1/kernel") to a pair
(torch key, transform). `load_into` applies a table to a module and accounts for every key on
both sides: torch keys neither mapped nor ignored, table entries whose torch key is absent,
NNX variables the table leaves unset, and shape mismatches are all collected into one
`ConversionError` that lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

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


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drop `prefix` from every key that has it (e.g. 'module.' from DDP/EMA checkpoints)."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def build_abstract(build: Callable[..., nnx.Module], settings: Mapping, source: str) -> nnx.Module:
    """`build(settings["model"], ...)` under `nnx.eval_shape`: shapes only, no random init,
    since every variable is then set from the checkpoint.

    Raises:
      ConversionError: the settings do not describe a buildable model (prefixed by `source`).
    """
    from mlgraph.errors import ConfigError

    try:
        return nnx.eval_shape(
            lambda: build(
                settings["model"],
                num_classes=settings["num_classes"],
                image_size=settings["image_size"],
                rngs=nnx.Rngs(0),
            )
        )
    except (ValueError, ConfigError) as e:
        raise ConversionError(f"{source}: {e}") from e


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

"""Read a PyTorch-side checkpoint file into a flat `{key: numpy array}` state dict.

Formats:
* `.pth`, `.pt`, `.bin`: `torch.load(map_location="cpu", weights_only=True)` (torch is imported
  only here, so training never needs it). `weights_only=True` refuses arbitrary pickled code.
* `.safetensors`: `safetensors.numpy` (no torch needed unless the file holds bfloat16).
* `.npz`: numpy, e.g. a state dict dumped elsewhere with `np.savez(path, **state_dict)`.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlgraph.convert.core import ConversionError, to_numpy_state_dict

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".pkl")  # .tar: `model_best.pth.tar`; .pkl: Q2L
FORMATS = "'.pth', '.pt', '.bin', '.tar', '.pkl' (torch.save), '.safetensors' or '.npz'"
# Keys under which training scripts commonly nest the weights, in the order they are tried.
CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema")
TORCH_PIN = "torch==2.13.0"


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading a torch checkpoint needs PyTorch, which is not installed: "
            f"pip install {TORCH_PIN}"
        ) from e
    return torch


def _unwrap(obj: Any, path: pathlib.Path, container: str | None) -> Mapping[str, Any]:
    """Find the flat tensor dict in what `torch.load` returned."""
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{path}: expected a state dict (a mapping of names to tensors), got "
            f"{type(obj).__name__}; save the model's `state_dict()` rather than the model"
        )
    if container is not None:
        if container not in obj:
            raise ConversionError(
                f"{path}: no top-level key {container!r}; top-level keys: "
                f"{', '.join(map(str, list(obj)[:20]))}"
            )
        obj, used = obj[container], container
    elif all(_is_tensor(v) for v in obj.values()):
        used = None
    else:
        found = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            bad = [str(k) for k, v in obj.items() if not _is_tensor(v)]
            raise ConversionError(
                f"{path}: not a flat state dict and none of the container keys "
                f"{', '.join(CONTAINER_KEYS)} holds one; non-tensor entries: {', '.join(bad[:20])}"
            )
        used = found[0]
        obj = obj[used]
        if len(found) > 1:
            log.warning("%s: has several weight containers %s; using %r", path, found, used)
    if used is not None:
        log.info("%s: using the weights under the top-level key %r", path, used)
    bad = [str(k) for k, v in obj.items() if not _is_tensor(v)]
    if bad:
        where = f"under {used!r}" if used else "at the top level"
        raise ConversionError(f"{path}: non-tensor entries {where}: {', '.join(bad[:20])}")
    return obj


def _float32(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Half-precision arrays -> float32 (numpy reads bfloat16 only where ml_dtypes is loaded)."""
    return {
        k: v.astype(np.float32) if v.dtype.name in ("bfloat16", "float16") else v
        for k, v in state_dict.items()
    }


def read_state_dict(
    path: str | pathlib.Path, *, container: str | None = None
) -> dict[str, np.ndarray]:
    """Read a checkpoint file into `{key: numpy array}` (float16/bfloat16 become float32).

    Args:
      path: a `.pth`/`.pt`/`.bin`, `.safetensors` or `.npz` file.
      container: for torch files, the top-level key holding the weights. By default a flat
        dict is used as is, and otherwise the first of `CONTAINER_KEYS` that is present.

    Raises:
      FileNotFoundError: `path` does not exist.
      ConversionError: unknown extension or contents that are not a state dict.
      ImportError: a torch file while torch is not installed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (expected {FORMATS})")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        torch = _import_torch()
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only errors all mean "unreadable"
            raise ConversionError(f"{path}: could not read as a torch checkpoint: {e}") from e
        return _float32(to_numpy_state_dict(_unwrap(obj, path, container)))
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return _float32(to_numpy_state_dict(load_file(path)))
        except Exception as e:  # safetensors raises TypeError, SafetensorError, OSError...
            # numpy has no bfloat16: such files are read through torch.
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise ConversionError(f"{path}: could not read as safetensors: {e}") from e
            _import_torch()
            from safetensors.torch import load_file as load_torch

            return _float32(to_numpy_state_dict(load_torch(path)))
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return _float32({k: np.asarray(data[k]) for k in data.files})
        except ValueError as e:
            raise ConversionError(f"{path}: could not read as .npz: {e}") from e
    raise ConversionError(f"{path}: unknown checkpoint extension {suffix!r}; expected {FORMATS}")

"""Read a PyTorch-side checkpoint file into a flat `{key: numpy array}` state dict.

Formats:
* `.pth`, `.pt`, `.bin`, `.tar`, `.pkl`: `torch.load(map_location="cpu", weights_only=True,
  encoding="latin1")` (torch is imported only here, so training never needs it).
  `weights_only=True` refuses arbitrary pickled code; the numpy scalars that training scripts
  store next to the weights (Query2Label's and SSGRL's `best_mAP` is a `numpy.float64`) are
  allowed through torch's safe-globals list (`numpy_safe_globals`), nothing else. latin1 reads
  Python 2 pickles (SSGRL's files, PyTorch 0.4.1). `trust_pickle=True` loads with
  `weights_only=False` instead, for other legacy files: it runs any code pickled in the file.
  A TorchScript archive under one of these names (OpenAI's CLIP `ViT-B-16.pt`: a zip holding
  `constants.pkl` and `code/`, which `torch.load(weights_only=True)` refuses) is read as
  `torch.jit.load(path, map_location="cpu").state_dict()`, as OpenAI's own loader does: its
  pickles are read by TorchScript's own reader, which builds tensors and TorchScript types, not
  arbitrary Python objects, and no method of the module is called.
* `.safetensors`: `safetensors.numpy` (no torch needed unless the file holds bfloat16).
* `.npz`: numpy, e.g. a state dict dumped elsewhere with `np.savez(path, **state_dict)`.

`read_array` reads one array (label embeddings such as SigRL's `label_emb.pt`, a saved tensor)
from a `.npy`, a one-array `.npz` or a torch file holding one tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import pathlib
import pickle
import pickletools
import re
import warnings
import zipfile
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
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format (torch >= 1.6) and np.savez
# The legacy torch.save format (torch < 1.6, SSGRL's and ML-GCN's files): five pickles (this magic
# number, the protocol version, system info, the object, the storage keys), then the tensor data.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PICKLES = 5


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


def numpy_safe_globals() -> list[Any]:
    """What the numpy scalars of a checkpoint container need, as entries of torch's safe-globals
    list: numpy's scalar constructor under its numpy 2 and numpy 1 names
    (`numpy._core.multiarray.scalar`, `numpy.core.multiarray.scalar`), `numpy.dtype`, and the
    numeric dtype classes (`numpy.dtypes.Float64DType`...) whose instances the pickle builds."""
    try:
        scalar = importlib.import_module("numpy._core.multiarray").scalar
    except ImportError:  # numpy 1.x before the numpy._core aliases
        scalar = importlib.import_module("numpy.core.multiarray").scalar
    names = [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("_core", "core")]
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}
    return [*names, (np.dtype, "numpy.dtype"), *sorted(dtype_classes, key=str)]


# What torch's safe reader says of an object it will not build (rather than of a broken file).
REFUSALS = ("Unsupported global", "allowlisted", "unrecognized function")


def _refusal(path: pathlib.Path, error: Exception) -> str | None:
    """One line for a file `weights_only=True` refused, naming what it refused and the option
    that reads it anyway; None when the error is not such a refusal (a broken file)."""
    text = " ".join(str(error).split())
    if "weights only load failed" not in text.lower() or not any(r in text for r in REFUSALS):
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        what = f"it holds the global {found.group(1)}, which is not allowed"
    else:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        what = found.group(1).rstrip(". ") if found else "it holds objects that are not allowed"
    return (
        f"{path}: refused by torch.load(weights_only=True): {what}; if you trust the file, "
        "pass --option trust_pickle=true (it then runs any code pickled in the file)"
    )


def _reason(error: Exception) -> str:
    """A read failure in a few words: torch's safe reader's own reason without its advice, or
    the exception's type and message (a bare `KeyError: 101` is an unknown pickle opcode)."""
    text = " ".join(str(error).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if found:
        return found.group(1).rstrip(". ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def cut_short(path: pathlib.Path) -> bool:
    """Whether `path` ends before the end its own format records: a zip archive (torch.save,
    np.savez) without the central directory that closes it, a legacy torch.save file whose
    pickles stop before their end, or a `.safetensors` or `.npy` file shorter than its header
    says; what an interrupted download or copy leaves."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:  # nothing was written before the copy stopped
        return True
    if head == ZIP_MAGIC:
        return not zipfile.is_zipfile(path)
    if path.suffix.lower() == ".safetensors":
        return _safetensors_cut_short(path)
    if path.suffix.lower() == ".npy":
        return _npy_cut_short(path)
    return _legacy_pickles_cut_short(path)


def _npy_cut_short(path: pathlib.Path) -> bool:
    """Whether a `.npy` file is shorter than its header (shape and dtype) says."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            major, _ = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as e:  # numpy's "EOF: reading ..." when the header itself is cut
            return str(e).startswith("EOF")
        data_start = f.tell()
    return path.stat().st_size < data_start + math.prod(shape) * dtype.itemsize


def _legacy_pickles_cut_short(path: pathlib.Path) -> bool:
    """Whether a legacy torch.save file (its first pickle the magic number) runs out inside
    its leading pickles (a damaged byte fails before the end of the file instead)."""
    with open(path, "rb") as f:
        try:
            first = [(op.name, arg) for op, arg, _ in pickletools.genops(f)]
        except ValueError:
            return False  # not even the magic number: not a legacy file we can judge
        if ("LONG1", LEGACY_MAGIC) not in first:
            return False
        try:
            for _ in range(LEGACY_PICKLES - 1):
                for _ in pickletools.genops(f):
                    pass
        except ValueError:
            return f.read(1) == b""
    return False


def _safetensors_cut_short(path: pathlib.Path) -> bool:
    """Whether a `.safetensors` file is shorter than its header (8 bytes of length, then a
    JSON object of tensor offsets) says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(min(length, size))
    if not header.startswith(b"{"):
        return False  # not a safetensors header at all
    if size < 8 + length:
        return True
    try:
        tensors = json.loads(header)
        end = max(
            (v["data_offsets"][1] for k, v in tensors.items() if k != "__metadata__"), default=0
        )
    except (ValueError, TypeError, KeyError, IndexError):
        return False
    return size < 8 + length + end


def truncated(path: pathlib.Path, writer: str) -> ConversionError:
    """The one-line error for a file that `cut_short` finds cut short."""
    return ConversionError(
        f"{path}: truncated: the file ends after {path.stat().st_size:,} bytes, before the end "
        f"of what {writer} wrote; copy or download it again"
    )


def _torch_load(path: pathlib.Path, trust_pickle: bool) -> Any:
    torch = _import_torch()
    try:
        if trust_pickle:
            log.warning(
                "%s: trust_pickle=true: loading with weights_only=False, which executes any "
                "code pickled in the file",
                path,
            )
            return torch.load(path, map_location="cpu", weights_only=False, encoding="latin1")
        with torch.serialization.safe_globals(numpy_safe_globals()), warnings.catch_warnings():
            # torch warns that `encoding` needs weights_only=False, but its safe reader uses it.
            warnings.filterwarnings("ignore", "pickle_load_args only works", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, encoding="latin1")
    except Exception as e:  # pickle, zip and format errors all mean "unreadable"
        # Checked first: a cut pickle can read as a refused global ("torch._utils.").
        if cut_short(path) or "unexpected EOF" in str(e):  # the legacy format's tensor data
            raise truncated(path, "torch.save") from e
        refusal = _refusal(path, e) if isinstance(e, pickle.UnpicklingError) else None
        if refusal:
            raise ConversionError(refusal) from e
        raise ConversionError(
            f"{path}: not a torch checkpoint (torch.load failed: {_reason(e)}); expected a file "
            "written by torch.save"
        ) from e


def is_torchscript(path: pathlib.Path) -> bool:
    """Whether `path` is a TorchScript archive (`torch.jit.save`): a zip whose root folder holds
    `constants.pkl`, torch's own test (`torch.load` hands such files to `torch.jit.load`)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _jit_state_dict(path: pathlib.Path) -> dict[str, Any]:
    """The `state_dict()` of the TorchScript module in `path` (`torch.jit.load`, on the CPU)."""
    torch = _import_torch()
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # TorchScript's reader raises RuntimeError for most problems
        raise ConversionError(
            f"{path}: a TorchScript archive torch.jit.load could not read ({_reason(e)})"
        ) from e
    log.info("%s: a TorchScript archive; using its state_dict() (torch.jit.load)", path)
    return dict(module.state_dict())


def describe(value: Any) -> str:
    """A short account of a container entry: the value of a number or short string (with its
    numpy type), else its kind and size."""
    if isinstance(value, np.generic):
        return f"{value.item()!r} ({type(value).__module__}.{type(value).__name__})"
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if _is_tensor(value):
        if getattr(value, "ndim", None) == 0:
            return f"{value.item()!r} (0-d tensor)"
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        keys = ", ".join(map(str, list(value)[:5])) + (", ..." if len(value) > 5 else "")
        return f"mapping of {len(value)} ({keys})"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {len(value)}"
    return f"{type(value).__module__}.{type(value).__qualname__}"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file held.

    Attributes:
      state_dict: the weights, `{key: numpy array}`.
      container: the top-level key the weights were under, or None for a flat state dict.
      other: the container's other entries (epoch, best_mAP, optimizer, args...), described
        by `describe`.
      torchscript: the file was a TorchScript archive (its module's `state_dict()`).
    """

    state_dict: dict[str, np.ndarray]
    container: str | None = None
    other: dict[str, str] = dataclasses.field(default_factory=dict)
    torchscript: bool = False

    def note(self) -> str | None:
        """One line about the container (or the TorchScript archive) for a conversion
        summary; None for a flat file."""
        if self.torchscript:
            return "TorchScript archive: weights from its module's state_dict() (torch.jit.load)"
        if self.container is None:
            return None
        other = "; ".join(f"{k}={v}" for k, v in self.other.items()) or "none"
        return f"container: weights under {self.container!r}; other entries: {other}"


def _unwrap(
    obj: Any, path: pathlib.Path, container: str | None
) -> tuple[Mapping[str, Any], str | None]:
    """Find the flat tensor dict in what `torch.load` returned, and the key it was under."""
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
    return obj, used


def _float32(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Half-precision arrays -> float32 (numpy reads bfloat16 only where ml_dtypes is loaded)."""
    return {
        k: v.astype(np.float32) if v.dtype.name in ("bfloat16", "float16") else v
        for k, v in state_dict.items()
    }


def read_checkpoint(
    path: str | pathlib.Path, *, container: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """Read a checkpoint file: its weights as `{key: numpy array}` (float16/bfloat16 become
    float32) and, for a torch container, the key they were under and its other entries.

    Args:
      path: a `.pth`/`.pt`/`.bin`/`.tar`/`.pkl` (`torch.save`, or a TorchScript archive such as
        OpenAI's `ViT-B-16.pt`), `.safetensors` or `.npz` file.
      container: for torch files, the top-level key holding the weights. By default a flat
        dict is used as is, and otherwise the first of `CONTAINER_KEYS` that is present.
      trust_pickle: for torch files, load with `weights_only=False` (runs any code pickled in
        the file; a warning says so) instead of the safe reader.

    Raises:
      FileNotFoundError: `path` does not exist.
      ConversionError: unknown extension, contents that are not a state dict, or a torch file
        the safe reader refuses (the message names `trust_pickle`).
      ImportError: a torch file while torch is not installed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (expected {FORMATS})")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES and is_torchscript(path):
        if container is not None:
            raise ConversionError(
                f"{path}: a TorchScript archive holds one module's weights, not containers; "
                f"drop container={container!r}"
            )
        return Checkpoint(_float32(to_numpy_state_dict(_jit_state_dict(path))), torchscript=True)
    if suffix in TORCH_SUFFIXES:
        obj = _torch_load(path, trust_pickle)
        weights, used = _unwrap(obj, path, container)
        other = {str(k): describe(v) for k, v in obj.items() if used is not None and k != used}
        return Checkpoint(_float32(to_numpy_state_dict(weights)), used, other)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return Checkpoint(_float32(to_numpy_state_dict(load_file(path))))
        except Exception as e:  # safetensors raises TypeError, SafetensorError, OSError...
            if cut_short(path):
                raise truncated(path, "safetensors") from e
            # numpy has no bfloat16: such files are read through torch.
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise ConversionError(f"{path}: could not read as safetensors: {e}") from e
            _import_torch()
            from safetensors.torch import load_file as load_torch

            return Checkpoint(_float32(to_numpy_state_dict(load_torch(path))))
    if suffix == ".npz":
        with _reading_npz(path):
            with np.load(path, allow_pickle=False) as data:
                return Checkpoint(_float32({k: np.asarray(data[k]) for k in data.files}))
    raise ConversionError(f"{path}: unknown checkpoint extension {suffix!r}; expected {FORMATS}")


@contextlib.contextmanager
def _reading_npz(path: pathlib.Path):
    """numpy's errors reading the `.npz` at `path` as one ConversionError line: truncated, or
    what numpy said (a broken zip is a BadZipFile, which is no ValueError)."""
    try:
        yield
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, ConversionError):
            raise
        if cut_short(path):
            raise truncated(path, "numpy") from e
        raise ConversionError(f"{path}: could not read as .npz: {e}") from e


def read_state_dict(
    path: str | pathlib.Path, *, container: str | None = None, trust_pickle: bool = False
) -> dict[str, np.ndarray]:
    """The weights of a checkpoint file as `{key: numpy array}` (`read_checkpoint`, whose
    arguments and errors these are)."""
    return read_checkpoint(path, container=container, trust_pickle=trust_pickle).state_dict


ARRAY_FORMATS = "'.npy', '.npz' (one array) or a torch file holding one tensor"


def read_array(path: str | pathlib.Path, *, trust_pickle: bool = False) -> np.ndarray:
    """One array from `path`: a `.npy`, an `.npz` holding one array, or a torch file
    (`.pt`/`.pth`/...) holding one tensor (`torch.save(tensor)`, SigRL's `label_emb.pt`) or a
    mapping with exactly one tensor; half precision becomes float32.

    Raises:
      FileNotFoundError: `path` does not exist.
      ConversionError: another extension, or contents that are not one array.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {ARRAY_FORMATS})")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            value = np.load(path, allow_pickle=False)
        except ValueError as e:
            if cut_short(path):
                raise truncated(path, "numpy") from e
            raise ConversionError(f"{path}: could not read as .npy: {e}") from e
    elif suffix == ".npz":
        with _reading_npz(path), np.load(path, allow_pickle=False) as data:
            if len(data.files) != 1:
                raise ConversionError(
                    f"{path}: holds {len(data.files)} arrays ({', '.join(data.files[:5])}); "
                    "expected one"
                )
            value = data[data.files[0]]
    elif suffix in TORCH_SUFFIXES:
        obj = _torch_load(path, trust_pickle)
        if isinstance(obj, Mapping):
            tensors = [v for v in obj.values() if _is_tensor(v)]
            if len(tensors) != 1:
                raise ConversionError(
                    f"{path}: holds a mapping of {len(obj)} entries with {len(tensors)} "
                    "tensors; expected one tensor"
                )
            obj = tensors[0]
        if not _is_tensor(obj):
            raise ConversionError(
                f"{path}: holds a {type(obj).__name__}, not a tensor (expected torch.save(tensor))"
            )
        value = to_numpy_state_dict({"array": obj})["array"]
    else:
        raise ConversionError(f"{path}: unknown extension {suffix!r}; expected {ARRAY_FORMATS}")
    return _float32({"array": np.asarray(value)})["array"]

"""The fixed label inputs of the graph methods as files: word vectors [C, E] and label
co-occurrence counts [C, C], in the formats users hold them.

* `.npy`: the array itself (SSGRL's `vectors.npy`, `prob_train.npy`; what
  `python -m mlgraph.labels` writes).
* `.npz`: co-occurrence counts under 'counts' (`cooccurrence.save_counts`), or a single array.
* `.pkl`: the pickles the official ML-GCN repository ships (docs/ssgrl_mlgcn.md §3.1):
  `data/{coco,voc}/*_glove_word2vec.pkl`, a pickled float32 ndarray [C, 300], and
  `*_adj.pkl`, {'adj': [C, C] co-occurrence counts with a zero diagonal, 'nums': [C] image
  counts}, read as the counts with `nums` on the diagonal.

Pickles are read by `read_pickle`, an unpickler that resolves nothing but numpy's array, scalar
and dtype reconstruction, so a file can hold arrays but cannot run code. Python 2 pickles are
read with encoding='latin1', the encoding numpy needs for their array bytes.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlgraph import paths
from mlgraph.errors import ConfigError

# What a pickle of ndarrays and numpy scalars refers to (numpy 1 pickles name `numpy.core`,
# numpy 2 ones `numpy._core`; protocol 2 pickles bytes through `_codecs.encode`).
PICKLE_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")]
    + [(f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)
NUMPY_CORE = "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"
COUNTS, MATRIX = "counts", "matrix"


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `PICKLE_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused the global {module}.{name} (only numpy arrays are read from pickles)"
            )
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = NUMPY_CORE + module[module.index(".", len("numpy.")) :]
        return super().find_class(module, name)


def read_pickle(path: str | pathlib.Path | io.BytesIO) -> Any:
    """Unpickle `path`, allowing numpy arrays, scalars and dtypes but no other global (so no
    code runs); Python 2 pickles are read with encoding='latin1'.

    Raises:
      pickle.UnpicklingError: the file names another global, or is not a pickle.
      OSError, EOFError, ValueError: an unreadable or truncated file.
    """
    if isinstance(path, io.BytesIO):
        return _NumpyUnpickler(path, encoding="latin1").load()
    with open(path, "rb") as f:
        return _NumpyUnpickler(f, encoding="latin1").load()


def counts_from_adj(obj: Mapping[str, Any]) -> np.ndarray:
    """ML-GCN's {'adj': [C, C], 'nums': [C]} -> counts [C, C] float64 (nums on the diagonal).

    Raises:
      ValueError: `adj` not square, or `nums` not of length C.
    """
    counts = np.array(obj["adj"], np.float64)
    nums = np.asarray(obj["nums"], np.float64).reshape(-1)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or nums.size != counts.shape[0]:
        raise ValueError(
            f"'adj' has shape {counts.shape} and 'nums' {nums.size} entries; expected [C, C] and C"
        )
    np.fill_diagonal(counts, nums)
    return counts


def read_label_file(path: str | pathlib.Path, field: str) -> tuple[str, np.ndarray]:
    """The array in a label file (module docstring) and what it is: (COUNTS, counts [C, C])
    for ML-GCN's adj pickle or a `.npz` with 'counts', else (MATRIX, the array as stored).

    Args:
      path: a `.npy`, `.npz` or `.pkl` file.
      field: the config field (or flag) naming it, for the messages.

    Raises:
      ConfigError: '{field}={path}: ...' for a missing, unreadable or unknown file.
    """
    file = paths.path(path, field)
    if not file.is_file():
        raise ConfigError(f"{field}={path}: no such file")
    if paths.is_cloud(file):  # numpy and pickle read local files or file objects
        file = io.BytesIO(file.read_bytes())
        suffix = paths.epath.Path(os.fspath(path)).suffix.lower()
    else:
        suffix = file.suffix.lower()
    try:
        if suffix == ".npy":
            return MATRIX, np.load(file, allow_pickle=False)
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                if "counts" in data.files:
                    return COUNTS, np.asarray(data["counts"], np.float64)
                if len(data.files) == 1:
                    return MATRIX, np.asarray(data[data.files[0]])
                names = ", ".join(data.files) or "none"
            raise ConfigError(f"{field}={path}: expected 'counts' or a single array; holds {names}")
        if suffix == ".pkl":
            obj = read_pickle(file)
            if isinstance(obj, Mapping) and "adj" in obj and "nums" in obj:
                return COUNTS, counts_from_adj(obj)
            if isinstance(obj, np.ndarray):
                return MATRIX, obj
            raise ConfigError(
                f"{field}={path}: holds a {type(obj).__name__}; expected a pickled array (ML-GCN's "
                "*_glove_word2vec.pkl) or ML-GCN's {'adj', 'nums'} (*_adj.pkl)"
            )
    # A cut or damaged .npz is a BadZipFile, which is none of the others.
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{field}={path}: not a readable {suffix} file ({e})") from e
    raise ConfigError(f"{field}={path}: expected a .npy, .npz or .pkl file")

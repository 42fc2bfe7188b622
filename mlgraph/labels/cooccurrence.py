"""Statistical label co-occurrence from training labels (docs/ssgrl_mlgcn.md §1.4, §3.1).

The counts N [C, C] hold N[i, j] = number of training images that contain both i and j, with
N[i, i] the number of images containing i. From them:

* SSGRL's graph M[i, j] = N[i, j] / N[i, i] = P(j | i) (diagonal 1, or 0 with diagonal='zero');
* ML-GCN's `adj` (N with a zero diagonal) and `nums` (the diagonal), the input of `gen_A`.

A config names the counts by a path, or by the special value `TRAIN_LABELS`, which
`mlgraph.assets.resolve_graph` turns into the counts of the built data set's training split
(read by `mlgraph.data.cooccurrence`), computed once and cached next to it.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np

from mlgraph.errors import ConfigError
from mlgraph.labels import arrays

TRAIN_LABELS = "train_labels"
DIAGONALS = ("one", "zero")


def counts_from_labels(labels: np.ndarray) -> np.ndarray:
    """Co-occurrence counts N = Y^T Y [C, C] (float64) of multi-hot labels Y [num_images, C].

    Entries > 0 count as present (SSGRL binarises its COCO label vectors the same way).
    """
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be [num_images, C], got shape {y.shape}")
    y = (y > 0).astype(np.float64)
    return y.T @ y


def conditional_probability(counts: np.ndarray, diagonal: str = "one") -> np.ndarray:
    """SSGRL's M[i, j] = N[i, j] / N[i, i] = P(j | i) as float32 [C, C].

    Rows of classes never seen in training are zero. `diagonal` is 'one' (the LTT-O helper's
    convention: P(i | i) = 1 for seen classes) or 'zero' (jasonseu's).
    """
    if diagonal not in DIAGONALS:
        raise ConfigError(f"graph diagonal {diagonal!r}: expected one of {', '.join(DIAGONALS)}")
    n = np.asarray(counts, np.float64)
    nums = np.diag(n).copy()
    probs = np.divide(n, nums[:, None], out=np.zeros_like(n), where=nums[:, None] > 0)
    if diagonal == "zero":
        np.fill_diagonal(probs, 0.0)
    return probs.astype(np.float32)


def mlgcn_correlation(counts: np.ndarray, tau: float = 0.4, p: float = 0.25) -> np.ndarray:
    """ML-GCN's `gen_A` (before D A^T D): A = p * B / (colsum(B) + 1e-6) + I, float32 [C, C].

    With adj = N off the diagonal and nums = diag(N): P[i, j] = adj[i, j] / nums[i], B = 1[P >=
    tau]. A class with nums 0 gives a zero row (the official code would divide by zero).
    """
    n = np.asarray(counts, np.float64)
    nums = np.diag(n).copy()
    adj = n - np.diag(nums)
    probs = np.divide(adj, nums[:, None], out=np.zeros_like(adj), where=nums[:, None] > 0)
    binary = (probs >= tau).astype(np.float64)
    a = binary * p / (binary.sum(axis=0, keepdims=True) + 1e-6)
    return (a + np.eye(n.shape[0])).astype(np.float32)


def normalize_adjacency(a: np.ndarray) -> np.ndarray:
    """ML-GCN's `gen_adj`: D A^T D with D = diag(rowsum(A)^-1/2) (numpy reference, float32)."""
    a = np.asarray(a, np.float64)
    d = np.diag(a.sum(axis=1) ** -0.5)
    return (d @ a.T @ d).astype(np.float32)


def load_counts(path: str | os.PathLike, num_classes: int, field: str) -> np.ndarray:
    """Read co-occurrence counts [C, C] (float64) from a file named by config field `field`.

    Formats (`mlgraph.labels.arrays`): `.npz` with 'counts' (written by `save_counts`),
    ML-GCN's `*_adj.pkl` {'adj': [C, C], 'nums': [C]} (the counts are adj with nums on the
    diagonal), or a `.npy` of the counts (`python -m mlgraph.labels --from_file` writes one
    from the pickle).

    Raises:
      ConfigError: missing file, unknown format, missing entries or a wrong shape.
    """
    _, counts = arrays.read_label_file(path, field)
    counts = np.asarray(counts, np.float64)
    if counts.shape != (num_classes, num_classes):
        raise ConfigError(
            f"{field}={path}: counts of shape {counts.shape}; expected "
            f"[{num_classes}, {num_classes}]"
        )
    return counts


def save_counts(path: str | os.PathLike, counts: np.ndarray) -> None:
    """Write counts to a `.npz` atomically (a concurrent reader never sees half a file)."""
    path = pathlib.Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, counts=np.asarray(counts, np.float64))
    os.replace(f.name, path)

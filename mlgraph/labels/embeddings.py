"""The label-embedding table [C, E] a config names (`config.model.embed_path`), read from its
file and checked against the model, and the check that a config's label graph is a file.

Model-neutral (numpy only): the models build their buffers from these, and the converters and
`mlgraph.evaluate` read user files with them.
"""

from __future__ import annotations

import numpy as np

from mlgraph.errors import ConfigError
from mlgraph.labels import arrays, cooccurrence


def load_embeddings(
    path: str, num_classes: int, embed_dim: int = 0, field: str = "config.model.embed_path"
) -> np.ndarray:
    """Read label embeddings [C, E] as float32 from a `.npy`, a `.npz` holding one array, or a
    pickled array such as ML-GCN's `*_glove_word2vec.pkl` (`mlgraph.labels.arrays`),
    checking their shape; `field` names where the path came from in errors.

    Raises:
      ConfigError: no path, a missing or unreadable file, or a shape other than
        [num_classes, E] (with E == embed_dim when embed_dim > 0).
    """
    if not path:
        raise ConfigError(
            f"{field}: embed_type='file' needs a .npy file of label embeddings "
            "[num_classes, E] (see python -m mlgraph.labels), or use embed_type='random'"
        )
    kind, table = arrays.read_label_file(path, field)
    if kind == arrays.COUNTS:
        raise ConfigError(f"{field}={path}: holds co-occurrence counts, not label embeddings")
    if table.ndim != 2 or table.shape[0] != num_classes:
        raise ConfigError(
            f"{field}={path}: holds an array of shape {table.shape}; expected "
            f"[{num_classes}, E] (one row per class)"
        )
    if embed_dim and table.shape[1] != embed_dim:
        raise ConfigError(
            f"{field}={path}: embeddings have width {table.shape[1]}, but "
            f"config.model.embed_dim={embed_dim}"
        )
    return table.astype(np.float32)


def word_vectors(path: str, embed_dim: int, num_classes: int, method: str) -> np.ndarray:
    """Label word vectors [C, E] from `path`, or zeros [C, embed_dim] to be filled from a
    weights checkpoint when `path` is empty."""
    if path:
        return load_embeddings(path, num_classes, embed_dim)
    if embed_dim > 0:
        return np.zeros((num_classes, embed_dim), np.float32)
    raise ConfigError(
        f"config.model.embed_path: {method} needs word vectors (a .npy, .npz or .pkl [C, E] "
        "file or 'minilm'), or embed_dim > 0 for vectors filled from a checkpoint"
    )


def check_graph_resolved(graph_path: str) -> None:
    """`graph_path='train_labels'` must have been turned into a file by
    `mlgraph.assets.resolve_graph` (the models cannot read a built data set)."""
    if graph_path == cooccurrence.TRAIN_LABELS:
        raise ConfigError(
            "config.model.graph_path='train_labels' must be resolved to a file first "
            "(mlgraph.assets.resolve_graph)"
        )

"""Small pieces shared by the models: the buffer variable type, the loaders of the fixed inputs
the graph methods read (label word vectors, label graphs), and the CNN backbone of a
`config.model`."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.data import array_files, cooccurrence
from mlgraph.errors import ConfigError
from mlgraph.models import backbones

# The default of a `backbone_kwargs` field: an empty mapping that no call can mutate.
NO_KWARGS: Mapping[str, Any] = types.MappingProxyType({})


class Buffer(nnx.Variable):
    """Non-trainable model state that is part of the checkpoint and of the EMA.

    Examples: SALGL's scene co-occurrence counts (updated in the training step) and fixed label
    embeddings loaded from a file. Gradients are taken with respect to `nnx.Param` only, so a
    Buffer is never touched by the optimizer.
    """


def load_embeddings(path: str, num_classes: int, embed_dim: int = 0) -> np.ndarray:
    """Read label embeddings [C, E] as float32 from a `.npy`, a `.npz` holding one array, or a
    pickled array such as ML-GCN's `*_glove_word2vec.pkl` (`mlgraph.data.array_files`),
    checking their shape.

    Raises:
      ConfigError: no path, a missing or unreadable file, or a shape other than
        [num_classes, E] (with E == embed_dim when embed_dim > 0).
    """
    field = "config.model.embed_path"
    if not path:
        raise ConfigError(
            f"{field}: embed_type='file' needs a .npy file of label embeddings "
            "[num_classes, E] (see mlgraph.data.label_embed), or use embed_type='random'"
        )
    kind, table = array_files.read_label_file(path, field)
    if kind == array_files.COUNTS:
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
    """`graph_path='train_labels'` must have been turned into a file by `assets.resolve`."""
    if graph_path == cooccurrence.TRAIN_LABELS:
        raise ConfigError(
            "config.model.graph_path='train_labels' must be resolved to a file first "
            "(mlgraph.data.cooccurrence.resolve)"
        )


def cnn_backbone(
    name: str,
    backbone_kwargs: Mapping[str, Any],
    method: str,
    *,
    image_size: int,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The registered backbone `name`, which must be a CNN (have a `feature_map`).

    Raises:
      ConfigError: a backbone without a feature map (e.g. a ViT).
    """
    backbone = backbones.build(
        name, image_size=image_size, dtype=dtype, rngs=rngs, **backbone_kwargs
    )
    if not hasattr(backbone, "feature_map"):
        raise ConfigError(
            f"config.model.backbone={name!r}: {method} needs a CNN backbone "
            "(one with a feature map)"
        )
    return backbone

"""Label co-occurrence counts of a built data set's split (docs/ssgrl_mlgcn.md §1.4, §3.1).

The statistics themselves (counts from labels, the graphs, the counts file) live in
`mlgraph.labels.cooccurrence`, where the models read them; here only the part that needs a
built TFDS data set: reading a split's labels and caching their counts next to it.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from mlgraph.labels.cooccurrence import counts_from_labels, save_counts


def split_labels(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The label vectors [num_images, C] of `split` of a built TFDS data set (images skipped)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(data_dir))
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return np.stack([np.asarray(source[i]["labels"], np.float32) for i in range(len(source))])


def train_counts(data_dir: str | os.PathLike, split: str) -> pathlib.Path:
    """The counts of `split`'s labels, written once to `data_dir/cooccurrence_<split>.npz`."""
    path = pathlib.Path(data_dir) / f"cooccurrence_{split}.npz"
    if not path.exists():
        save_counts(path, counts_from_labels(split_labels(data_dir, split)))
    return path

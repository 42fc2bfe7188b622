"""The command line of `mlgraph.labels`: label embeddings [C, E] written to a .npy file.

    python -m mlgraph.labels --classes labels.txt --output minilm.npy
    python -m mlgraph.labels --dataset coco2014 --output minilm.npy
    python -m mlgraph.labels --classes "cat,dog" --output e.npy \\
        --encoder bert --weights weights/bert_base --vocab bert-base-uncased/vocab.txt
    python -m mlgraph.labels --classes Concepts925.txt --output label_emb.npy \\
        --encoder clip --weights weights/clip_text --vocab bpe_simple_vocab_16e6.txt.gz

The encoders and their recipes: `mlgraph.labels.encoders`. `--template` (alias `--prompt`)
replaces the prompt ("{}" = the bare name, the default for minilm, bert and glove). Class lists
are a text file (one name per line), a comma-separated list, or the class names of a data set
built by `mlgraph.data.build` (`--dataset`, with `--data_dir` and `--builder_config`).

`--from_file` instead converts a file of the official repositories to `.npy`: word vectors such
as ML-GCN's `coco_glove_word2vec.pkl` (or a `.npz`) become float32 [C, E], label statistics
such as ML-GCN's `coco_adj.pkl` become the co-occurrence counts [C, C] that
`config.model.graph_path` reads:

    python -m mlgraph.labels --from_file coco_glove_word2vec.pkl --output glove.npy

An entry point: it may import `mlgraph.cli` and `mlgraph.data`, which the library may not.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from mlgraph import cli
from mlgraph.errors import MlgraphError
from mlgraph.labels.encoders import (
    ENCODERS,
    LabelEmbedError,
    convert_label_file,
    embed_labels,
    read_class_names,
)


def dataset_class_names(name: str, data_dir: str = "", builder_config: str = "") -> list[str]:
    """The class names, in index order, of a data set built with `mlgraph.data.build`.

    Raises:
      LabelEmbedError: an unknown data set, or one not built in `data_dir`.
    """
    # TFDS is slow to import, and only --dataset needs it.
    import tensorflow_datasets as tfds

    from mlgraph.data import datasets

    data_dir = data_dir or str(datasets.default_data_dir())
    try:
        built = pathlib.Path(datasets.make_builder(name, data_dir, builder_config).data_dir)
    except MlgraphError as e:
        raise LabelEmbedError(str(e)) from None
    if not (built / "dataset_info.json").exists():
        raise LabelEmbedError(
            f"data set '{name}' is not built: looked in {built}; build it once with: "
            f"python -m mlgraph.data.build {name} --manual_dir RAW --data_dir {data_dir}"
        )
    return list(tfds.builder_from_directory(str(built)).info.metadata["class_names"])


_FLAGS = flags.FlagValues()  # not absl's global FLAGS: see mlgraph.cli
_CLASSES = flags.DEFINE_string(
    "classes", None, "file (one name a line) or a,b,c", flag_values=_FLAGS
)
_DATASET = flags.DEFINE_string(
    "dataset", None, "a data set built by mlgraph.data.build", flag_values=_FLAGS
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "with --dataset: where it was built", flag_values=_FLAGS
)
_BUILDER_CONFIG = flags.DEFINE_string(
    "builder_config", "", "with --dataset, e.g. 'all'", flag_values=_FLAGS
)
_OUTPUT = flags.DEFINE_string("output", None, "output .npy file", flag_values=_FLAGS)
_ENCODER = flags.DEFINE_enum("encoder", "minilm", ENCODERS, "the text encoder", flag_values=_FLAGS)
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "bert/clip: folder of the converted encoder", flag_values=_FLAGS
)
_VOCAB = flags.DEFINE_string(
    "vocab",
    None,
    "bert: vocab.txt; clip: bpe_simple_vocab_16e6.txt.gz; glove: vectors .txt",
    flag_values=_FLAGS,
)
_TEMPLATE = flags.DEFINE_string(
    "template", None, 'prompt with "{}" for the name', flag_values=_FLAGS
)
# SigRL's and MKT's name for it ("There is a {} in the scene").
flags.DEFINE_alias("prompt", "template", flag_values=_FLAGS)
_FROM_FILE = flags.DEFINE_string(
    "from_file",
    None,
    "convert word vectors or label statistics (.pkl, .npz, .npy) to .npy",
    flag_values=_FLAGS,
)
flags.mark_flags_as_mutual_exclusive(
    ["classes", "dataset", "from_file"], required=True, flag_values=_FLAGS
)
flags.mark_flag_as_required("output", flag_values=_FLAGS)
USAGE = """usage: python -m mlgraph.labels (--classes CLASSES | --dataset DATASET)
    --output OUTPUT [--encoder {minilm,bert,clip,glove}] [...]
       python -m mlgraph.labels --from_file FILE --output OUTPUT

Write label embeddings [C, E] (float32 .npy) for a class list, or convert an official word-vector
or label-statistics file (ML-GCN's *_glove_word2vec.pkl, *_adj.pkl) to .npy.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a user error).

    `argv` holds the arguments after the program name (None: `sys.argv[1:]`).
    """
    try:
        extra = cli.parse(_FLAGS, argv, USAGE)
        if extra:
            raise app.UsageError(f"unexpected arguments: {' '.join(extra)}")
        output = pathlib.Path(_OUTPUT.value)
        if not output.parent.is_dir():
            raise LabelEmbedError(f"{output.parent}: output folder does not exist")
        if _FROM_FILE.value:
            array, what = convert_label_file(_FROM_FILE.value)
            np.save(output, array)
            print(f"{output}: {array.shape[0]} x {array.shape[1]} {what} from {_FROM_FILE.value}")
            return 0
        if _DATASET.value:
            names = dataset_class_names(_DATASET.value, _DATA_DIR.value, _BUILDER_CONFIG.value)
        else:
            names = read_class_names(_CLASSES.value)
        emb = embed_labels(
            names,
            _ENCODER.value,
            weights=_WEIGHTS.value,
            vocab=_VOCAB.value,
            template=_TEMPLATE.value,
        )
    except (app.UsageError, LabelEmbedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.save(output, emb)
    print(f"{output}: {emb.shape[0]} classes x {emb.shape[1]} ({_ENCODER.value})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A data set kept outside the package, for the registry test: the custom text format under
its own TFDS builder name, with the single-positive rows in the order its list files give."""

from __future__ import annotations

import pathlib

from mlgraph.data import custom, registry
from mlgraph.data.observed import SourceOrder


class ToyShapes(custom.Custom):
    """`custom.Custom` under its own name (TFDS registers builders by name)."""

    name = "toy_shapes"


def source_order(root: pathlib.Path, split: str) -> SourceOrder:
    """The split file's image order, the order the toy's single-positive rows follow."""
    lines = (root / f"{split}.txt").read_text().splitlines()
    return SourceOrder(image_ids=tuple(line.split("\t")[0] for line in lines if line.strip()))


TOY = registry.DataSet(
    "toy_shapes",
    "toy.dataset:ToyShapes",
    "train",
    "test",
    3,
    spml_rules="nuswide",  # rows in the raw list's order, as Cole's NUS-WIDE files
    raw_order="toy.dataset:source_order",
)

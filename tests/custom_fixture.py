"""A small custom data set folder: images, classes.txt and train.txt / test.txt label lists."""

from __future__ import annotations

import pathlib

import numpy as np
from image_fixture import write_image

# Not alphabetical on purpose, and one name with a space.
CLASSES = ["dog", "traffic light", "cat"]


def write_custom(
    root: pathlib.Path, lines: dict[str, list[str]], images: dict[str, str]
) -> tuple[pathlib.Path, dict[str, np.ndarray | None]]:
    """Write classes.txt, the split files (lines as given) and images {relative path: kind}."""
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES) + "\n")
    for split, split_lines in lines.items():
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in split_lines))
    pictures = {
        rel: write_image(root / rel, kind, k) for k, (rel, kind) in enumerate(images.items())
    }
    return root, pictures

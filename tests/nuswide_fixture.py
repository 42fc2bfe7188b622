"""A small NUS-WIDE tree (Flickr/, ImageList/, Groundtruth/AllLabels/, Concepts81.txt)."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from image_fixture import write_image

# Not alphabetical on purpose: the class order must be the file's order.
CONCEPTS = ["sky", "animal", "water", "person", "zebra"]


@dataclasses.dataclass
class Entry:
    """One Imagelist.txt line: Windows path, concepts, official split ('' none), image kind."""

    line: str
    concepts: tuple[str, ...]
    split: str
    kind: str | None = "rgb"


def write_nuswide(
    root: pathlib.Path, entries: list[Entry]
) -> tuple[pathlib.Path, dict[str, np.ndarray | None]]:
    """Write the tree with Windows line endings; return (root, expected RGB per entry)."""
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth" / "AllLabels").mkdir(parents=True)
    (root / "Flickr").mkdir()
    crlf = {"newline": "\r\n"}
    with open(root / "Concepts81.txt", "w", **crlf) as f:
        f.write("".join(f"{c}\n" for c in CONCEPTS))
    with open(root / "ImageList" / "Imagelist.txt", "w", **crlf) as f:
        f.write("".join(f"{e.line}\n" for e in entries))
    for split, name in (("train", "TrainImagelist.txt"), ("test", "TestImagelist.txt")):
        # The official split lists name images relative to Flickr/.
        lines = [e.line.split("Flickr\\")[-1] for e in entries if e.split == split]
        with open(root / "ImageList" / name, "w", **crlf) as f:
            f.write("".join(f"{line}\n" for line in lines))
    for c in CONCEPTS:
        with open(root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt", "w", **crlf) as f:
            f.write("".join(f"{int(c in e.concepts)}\n" for e in entries))
    pictures = {}
    for k, e in enumerate(entries):
        rel = e.line.split("Flickr\\")[-1].replace("\\", "/")
        if e.kind is not None:
            pictures[rel] = write_image(root / "Flickr" / rel, e.kind, k)
    return root, pictures


def write_tags(
    root: pathlib.Path,
    tags: list[str],
    entry_tags: list[tuple[str, ...]],
    *,
    tag_list_at_root: bool = False,
) -> None:
    """Write the NUS_WID_Tags files of config 'ov': TagList1k.txt (under NUS_WID_Tags/, or at
    the root of the tree) and AllTags1k.txt, one row per Imagelist.txt line (`entry_tags`, in
    the same order) of tab-separated 0/1 values, with a trailing tab as in the official file."""
    (root / "NUS_WID_Tags").mkdir(exist_ok=True)
    crlf = {"newline": "\r\n"}
    tag_list = root / "TagList1k.txt" if tag_list_at_root else root / "NUS_WID_Tags/TagList1k.txt"
    with open(tag_list, "w", **crlf) as f:
        f.write("".join(f"{t}\n" for t in tags))
    with open(root / "NUS_WID_Tags" / "AllTags1k.txt", "w", **crlf) as f:
        for present in entry_tags:
            f.write("".join(f"{int(t in present)}\t" for t in tags) + "\n")

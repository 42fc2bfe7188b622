"""NUS-WIDE (81 concepts, official split) as a TFDS builder writing array_record.

Reads `manual_dir` in the layout of the official NUS-WIDE download:

    Flickr/<folder>/<file>.jpg                 Concepts81.txt
    ImageList/Imagelist.txt                    ImageList/{Train,Test}Imagelist.txt
    Groundtruth/AllLabels/Labels_<concept>.txt

following SALGL's scripts/nuswide.py:

* Imagelist.txt lists every image once; backslashes become '/', and an entry is the image's path
  under `Flickr/` (a leading prefix that ends in a `Flickr` folder, such as
  `C:\\ImageData\\Flickr\\`, is cut off so that either form of the list works).
* `Labels_<concept>.txt` holds one 0/1 per Imagelist line; a mismatch in line count or any other
  value is an error naming the file (and line).
* Images with no positive concept are dropped (counted in `info.metadata['dropped_no_labels']`);
  the rest go to 'train' or 'test' by the official Train/Test lists. Images in neither list are
  dropped and counted in `info.metadata['unlisted']`; an image in both is an error.
* Classes are the concepts in Concepts81.txt order (alphabetical: airport ... zebra).

SALGL stops when a listed image is missing. Many Flickr URLs are dead, so local copies differ:
here a missing or unreadable image is reported by path and skipped
(`info.metadata['skipped'][split]`), and `strict=True` restores SALGL's stop with a DataError.
`image_id` (text) is the entry, e.g. "actor/0001_2124494179.jpg".
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from mlgraph.data import builder_lib, images
from mlgraph.errors import DataError

SPLIT_LISTS = {"train": "TrainImagelist.txt", "test": "TestImagelist.txt"}


# The label files under Groundtruth/AllLabels are checked later, once the concepts are read.
REQUIRED = [
    "Flickr",
    "Concepts81.txt",
    "ImageList/Imagelist.txt",
    *(f"ImageList/{name}" for name in SPLIT_LISTS.values()),
    "Groundtruth/AllLabels",
]


def check_manual_dir(root: str | pathlib.Path) -> pathlib.Path:
    """`root` as a path; a DataError names every NUS-WIDE file or folder it lacks."""
    return builder_lib.check_manual_dir(
        root,
        "NUS-WIDE",
        REQUIRED,
        "Flickr/, Concepts81.txt, ImageList/{Imagelist,TrainImagelist,TestImagelist}.txt, "
        "Groundtruth/AllLabels/",
    )


def normalize_entry(line: str) -> str:
    """An image-list line as a '/'-separated path under Flickr/."""
    parts = line.strip().replace("\\", "/").split("/")
    if "Flickr" in parts:
        parts = parts[len(parts) - parts[::-1].index("Flickr") :]
    return "/".join(p for p in parts if p)


def read_list(path: pathlib.Path) -> list[str]:
    """Normalised entries of an image-list file, blank lines left out."""
    return [normalize_entry(line) for line in path.read_text().splitlines() if line.strip()]


def read_concepts(path: pathlib.Path) -> list[str]:
    """Concept names in file order; duplicates are an error."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no concept names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: concept(s) listed twice: {', '.join(dup)}")
    return names


def read_label_column(path: pathlib.Path, num_images: int) -> np.ndarray:
    """One concept's 0/1 column, checked against the number of Imagelist entries."""
    lines = path.read_text().splitlines()
    # Trailing blank lines are harmless; anything else must be exactly one 0/1 per line.
    while lines and not lines[-1].strip():
        lines.pop()
    values = [v.strip() for v in lines]
    bad = next((i for i, v in enumerate(values) if v not in ("0", "1")), None)
    if bad is not None:
        raise DataError(f"{path}:{bad + 1}: expected 0 or 1, found '{lines[bad]}'")
    if len(values) != num_images:
        raise DataError(
            f"{path}: {len(values)} lines, expected one per ImageList/Imagelist.txt entry "
            f"({num_images})"
        )
    return np.asarray(values) == "1"


def read_labels(root: pathlib.Path, concepts: list[str], num_images: int) -> np.ndarray:
    """uint8 [num_images, C] label matrix from Groundtruth/AllLabels."""
    folder = root / "Groundtruth" / "AllLabels"
    paths = [folder / f"Labels_{c}.txt" for c in concepts]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{folder}: missing label file(s) {', '.join(missing)}")
    labels = np.zeros((num_images, len(concepts)), np.uint8)
    for c, path in enumerate(paths):
        labels[:, c] = read_label_column(path, num_images)
    return labels


def assign_splits(root: pathlib.Path, entries: list[str]) -> np.ndarray:
    """Split name per Imagelist entry ('' for images in neither official list)."""
    lists = {
        split: set(read_list(root / "ImageList" / name)) for split, name in SPLIT_LISTS.items()
    }
    both = sorted(lists["train"] & lists["test"])
    if both:
        raise DataError(
            f"{root / 'ImageList'}: {len(both)} image(s) in both TrainImagelist.txt and "
            f"TestImagelist.txt, e.g. {', '.join(both[:3])}"
        )
    where = np.full(len(entries), "", dtype=object)
    for split, names in lists.items():
        where[[i for i, e in enumerate(entries) if e in names]] = split
    return where


class NusWide(builder_lib.MultiLabelBuilder):
    """NUS-WIDE 81-concept multi-label classification ('train', 'test'; official lists)."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "NUS-WIDE 81-concept multi-label: image, multi-hot labels, image path."
    HOMEPAGE = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unpack the NUS-WIDE images (Flickr/), ImageList.zip, Groundtruth.zip and "
        "Concepts81.txt into manual_dir."
    )

    def _split_generators(self, dl_manager):
        root = check_manual_dir(pathlib.Path(dl_manager.manual_dir))
        concepts = read_concepts(root / "Concepts81.txt")
        entries = read_list(root / "ImageList" / "Imagelist.txt")
        dup = [e for e, n in collections.Counter(entries).items() if n > 1]
        if dup:
            raise DataError(
                f"{root / 'ImageList' / 'Imagelist.txt'}: {len(dup)} image(s) listed more than "
                f"once, e.g. {', '.join(dup[:3])}"
            )
        labels = read_labels(root, concepts, len(entries))
        where = assign_splits(root, entries)
        has_label = labels.any(1)
        self.info.metadata["class_names"] = concepts
        self.info.metadata["skipped"] = {}
        self.info.metadata["dropped_no_labels"] = {
            split: int(((where == split) & ~has_label).sum()) for split in SPLIT_LISTS
        }
        self.info.metadata["unlisted"] = int((where == "").sum())
        rows = {
            split: [(entries[i], labels[i]) for i in np.flatnonzero(has_label & (where == split))]
            for split in SPLIT_LISTS
        }
        return {split: self._generate_examples(root, split, rows[split]) for split in SPLIT_LISTS}

    def _generate_examples(self, root, split, rows):
        skipped = []
        for entry, y in rows:
            try:
                data, _ = images.rgb_jpeg_bytes(root / "Flickr" / entry)
            except images.BadImage as e:
                if self.strict:
                    raise DataError(f"{e} (--strict)") from None
                skipped.append(str(e))
                continue
            yield entry, {"image": data, "labels": y, "image_id": entry}
        self.info.metadata["skipped"][split] = skipped

"""A user's own multi-label data set, in SALGL's text format, as a TFDS builder.

`manual_dir` holds the images (any folder structure) and three text files:

    classes.txt   one class name per line; the order defines the class indices
    train.txt     one image per line: <path><TAB><label>,<label>,...
    test.txt      the same for the 'test' split

Paths are relative to `manual_dir` (absolute paths are used as they are). Label names are the
lines of classes.txt: they may hold spaces but not commas, and surrounding spaces are ignored, as
are blank lines and empty items (a trailing comma). A line with an empty label field (`path<TAB>`
or just `path`) is an image with no labels, kept with an all-zero label vector.

The files must be UTF-8 (anything else is an error naming the file, line and byte). A line
naming a label that is not in classes.txt, an image listed twice in a split, and a missing or
unreadable image (named by path, with a hint when the line has spaces but no tab) are reported
as `file:line: ...` and skipped (`info.metadata['skipped'][split]`), or with `strict=True` stop
the build with a DataError.
`image_id` (text) is the path as written in the split file.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from mlgraph import textfiles
from mlgraph.data import builder_lib, images
from mlgraph.errors import DataError

SPLITS = ("train", "test")
CLASSES_FILE = "classes.txt"


class LineError(Exception):
    """A split-file line cannot be used."""


def check_manual_dir(root: str | pathlib.Path) -> pathlib.Path:
    """`root` as a path; a DataError names every expected file it lacks."""
    return builder_lib.check_manual_dir(
        root,
        "custom data set",
        [CLASSES_FILE] + [f"{split}.txt" for split in SPLITS],
        "classes.txt, train.txt and test.txt of <path><TAB><label>,<label>,... lines",
    )


def read_classes(path: pathlib.Path) -> list[str]:
    """Class names in file order; a comma in a name or a name listed twice is an error."""
    names = []
    for n, line in enumerate(textfiles.read_utf8(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if "," in name:
            raise DataError(f"{path}:{n}: class name '{name}' contains a comma")
        if name in names:
            raise DataError(f"{path}:{n}: class '{name}' listed twice")
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def parse_line(line: str, where: str, class_index: dict[str, int]) -> tuple[str, np.ndarray]:
    """(image path, multi-hot labels) of one split-file line; `where` is 'file:line'."""
    path, _, field = line.partition("\t")
    path = path.strip()
    if not path:
        raise LineError(f"{where}: no image path before the tab")
    y = np.zeros(len(class_index), np.uint8)
    for name in (item.strip() for item in field.split(",")):
        if not name:
            continue
        if name not in class_index:
            raise LineError(f"{where}: unknown label '{name}' (not in {CLASSES_FILE})")
        y[class_index[name]] = 1
    return path, y


def read_image(
    path: pathlib.Path, line: str, where: str, max_pixels: int
) -> tuple[bytes, tuple[int, int]]:
    """`images.rgb_jpeg_bytes(path, max_pixels)`, for the split-file line `line` at `where`
    ('file:line').

    Raises:
      LineError: the image is missing or unreadable; the message starts with `where`, so that
        the line to fix is named, then the image's path and why. A missing image on a line
        without a tab is most likely a path and labels separated by spaces, and it says so.
    """
    try:
        return images.rgb_jpeg_bytes(path, max_pixels)
    except images.BadImage as e:
        if "\t" not in line and " " in line.strip() and not path.exists():
            raise LineError(
                f"{where}: image {path} not found, and the line has no tab: separate the image "
                "path from its labels with a tab, not spaces"
            ) from None
        raise LineError(f"{where}: {e}") from None


def listed_outside(root: pathlib.Path) -> list[pathlib.Path]:
    """The images the split files list outside `root` (absolute paths, or '..' leading out)."""
    outside = []
    for split in SPLITS:
        list_path = root / f"{split}.txt"
        if not list_path.is_file():
            continue  # check_manual_dir names it when the build starts
        for line in textfiles.read_utf8(list_path).splitlines():
            path = pathlib.Path(os.path.normpath(root / line.partition("\t")[0].strip()))
            if not path.is_relative_to(os.path.normpath(root)):
                outside.append(path)
    return outside


class Custom(builder_lib.MultiLabelBuilder):
    """A folder of images with train.txt / test.txt label lists and classes.txt."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "Custom multi-label data: image, multi-hot labels, image path."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put classes.txt, train.txt and test.txt (lines <path><TAB><label>,<label>,..., paths "
        "relative to manual_dir) and the images into manual_dir."
    )

    @classmethod
    def source_paths(cls, root: pathlib.Path) -> list[pathlib.Path]:
        """All of `root`, and the images listed outside it."""
        return [root, *listed_outside(root)]

    def _split_generators(self, dl_manager):
        root = check_manual_dir(pathlib.Path(dl_manager.manual_dir))
        classes = read_classes(root / CLASSES_FILE)
        self.info.metadata["class_names"] = classes
        self.info.metadata["skipped"] = {}
        class_index = {name: i for i, name in enumerate(classes)}
        return {split: self._generate_examples(root, split, class_index) for split in SPLITS}

    def _generate_examples(self, root, split, class_index):
        list_path = root / f"{split}.txt"
        skipped = []
        kept = 0
        first_line: dict[str, int] = {}
        for n, line in enumerate(textfiles.read_utf8(list_path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{list_path}:{n}"
            try:
                path, y = parse_line(line, where, class_index)
                if path in first_line:
                    raise LineError(
                        f"{where}: image {path} already listed on line {first_line[path]}"
                    )
                first_line[path] = n
                data, _ = read_image(root / path, line, where, self.max_image_pixels)
            except LineError as e:
                if self.strict:
                    raise DataError(f"{e} (--strict)") from None
                skipped.append(str(e))
                continue
            kept += 1
            yield path, {"image": data, "labels": y, "image_id": path}
        if not kept:
            # TFDS would stop at an empty split with an assertion of its own.
            first = f"; the first: {skipped[0]}" if skipped else ""
            raise DataError(f"{list_path}: no usable image ({len(skipped)} lines skipped{first})")
        self.info.metadata["skipped"][split] = skipped

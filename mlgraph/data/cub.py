"""CUB-200-2011's 312 binary attributes as a multi-label TFDS builder writing array_record, made
as Cole et al. make it for the single-positive benchmark (`preproc/format_cub.py` of
elijahcole/single-positive-multi-label at 30ce86c; Zhou et al.'s copy in
Correr-Zhou/SPML-AckTheUnknown is the same but for its paths).

Reads `manual_dir`, the folder `CUB_200_2011.tgz` was unpacked into:

    CUB_200_2011/images.txt                          <image_id> <image_name>
    CUB_200_2011/train_test_split.txt                <image_id> <is_training_image>
    CUB_200_2011/attributes/image_attribute_labels.txt
                          <image_id> <attribute_id> <is_present> <certainty_id> <time>
    CUB_200_2011/images/<image_name>
    attributes.txt                                   <attribute_id> <attribute_name>

`attributes.txt` lies beside `CUB_200_2011/`, where the archive puts it (format_cub.py:40 and
Zhou's copy read it there); a copy at `CUB_200_2011/attributes/attributes.txt` is also taken.

Cole's preparation, and how the build follows it (format_cub.py line numbers):

* Classes: every attribute of attributes.txt in id order, 312 for the real files; none is
  filtered out (:12 `NUM_ATTRIBUTES = 312`, :67-68 one label per attribute). `class_names` are
  the attribute names, e.g. "has_bill_shape::curved_(up_or_down)".
* Present: an attribute is positive when `is_present` is 1. `certainty_id` and `time` are not
  read (:55 `usecols=['attribute_id', 'is_present']`, :68 `int(attributes_np[k, 1])`).
* Splits: 'train' holds the images with `is_training_image` 1 (5,994 in the real files),
  'test' those with 0 (5,794) (:70-75). Cole's 20 % validation cut of 'train' (RandomState
  1200, `datasets.py` `generate_split`) is made at training time
  (`mlgraph.data.observed.cole_split`, `config.data.val_fraction`).
* Images: every image of images.txt is kept, also one without any present attribute (Cole's
  loop, :65-75, keeps every image). `image_id` (int) is the images.txt id.
* Order: Cole's rows are images.txt's, filtered by split; the built data set does not keep
  it (TFDS stores examples in its own order), so `source_order` reads it back for the
  single-positive draws.

Cole reads image_attribute_labels.txt by position: row k is attribute k % 312 of the image on
images.txt row k // 312 (:65-69), the order his code takes the official file to have. Here each
line is placed by its own image and attribute ids, which gives the same labels on a file in that
order and never gives one image's labels to another. A line may hold more than five fields: as
in Cole's `pandas.read_csv`, whose C parser ignores extra fields when `usecols` is given, its
leading fields are read (image, attribute, is_present). Blank lines are ignored.

Malformed input is one DataError naming the file and line: a missing file, a line with too few
fields, a value that is no integer, `is_present` or `is_training_image` other than 0 or 1, an
image id listed twice or not in images.txt, an attribute id outside 1..C, an (image, attribute)
pair given twice or not at all, an image without a split line. A missing or unreadable image
file is reported by path and skipped (`info.metadata['skipped'][split]`), or with `strict=True`
stops the build with a DataError.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from mlgraph import textfiles
from mlgraph.data import builder_lib, images
from mlgraph.errors import ConfigError, DataError

FOLDER = "CUB_200_2011"
IMAGES_TXT = f"{FOLDER}/images.txt"
SPLIT_TXT = f"{FOLDER}/train_test_split.txt"
LABELS_TXT = f"{FOLDER}/attributes/image_attribute_labels.txt"
IMAGE_FOLDER = f"{FOLDER}/images"
# Where the attribute names are looked for, in this order (module docstring).
NAME_FILES = ("attributes.txt", f"{FOLDER}/attributes/attributes.txt")
REQUIRED = [IMAGES_TXT, SPLIT_TXT, LABELS_TXT, IMAGE_FOLDER]
LAYOUT = (
    f"{FOLDER}/{{images.txt,train_test_split.txt}}, {LABELS_TXT}, {IMAGE_FOLDER}/, and "
    "attributes.txt beside CUB_200_2011/: the unpacked CUB_200_2011.tgz"
)
# is_training_image -> split.
SPLITS = {"1": "train", "0": "test"}
LABEL_FIELDS = "<image_id> <attribute_id> <is_present> <certainty_id> <time>"


def check_manual_dir(root: str | pathlib.Path) -> pathlib.Path:
    """`root` as a path; a DataError names every CUB-200-2011 file or folder it lacks."""
    return builder_lib.check_manual_dir(root, "CUB-200-2011", REQUIRED, LAYOUT)


def _lines(path: pathlib.Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a small UTF-8 text file."""
    text = textfiles.read_utf8(path)
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _integer(path: pathlib.Path, n: int, what: str, value: str | bytes) -> int:
    """`value` as an int, or a DataError naming the file, line and field."""
    try:
        return int(value)
    except ValueError:
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        raise DataError(f"{path}:{n}: {what} '{value}' is not an integer") from None


def _count_error(path: pathlib.Path, n: int, found: int, expected: str, fields: str):
    return DataError(f"{path}:{n}: {found} field(s), expected {expected} ({fields})")


def _read_by_image(
    path: pathlib.Path,
    second: str,
    known: dict[int, str] | None = None,
    images_path: pathlib.Path | None = None,
) -> tuple[dict[int, str], dict[int, int]]:
    """({image id: its second field}, {image id: line}) of a two-field file keyed by image id,
    in file order; a line without two fields, an id that is no integer or is listed twice, or
    (given `known`, images.txt's) one not in `images_path`, is a DataError naming the line."""
    out: dict[int, str] = {}
    line_of: dict[int, int] = {}
    for n, fields in _lines(path):
        if len(fields) != 2:
            raise _count_error(path, n, len(fields), "2", f"<image_id> {second}")
        image_id = _integer(path, n, "image id", fields[0])
        if known is not None and image_id not in known:
            raise DataError(f"{path}:{n}: image id {image_id} is not in {images_path}")
        if image_id in out:
            raise DataError(
                f"{path}:{n}: image id {image_id} already listed on line {line_of[image_id]}"
            )
        out[image_id] = fields[1]
        line_of[image_id] = n
    return out, line_of


def read_images(path: pathlib.Path) -> dict[int, str]:
    """{image id: image name} of images.txt, in file order.

    Raises:
      DataError: a line without exactly two fields, an id that is no integer or listed twice,
        or no image at all.
    """
    out, _ = _read_by_image(path, "<image_name>")
    if not out:
        raise DataError(f"{path}: no images listed (expected <image_id> <image_name> a line)")
    return out


def read_split(
    path: pathlib.Path, image_ids: dict[int, str], images_path: pathlib.Path
) -> dict[int, str]:
    """{image id: 'train' or 'test'} of train_test_split.txt, every image of `image_ids` once.

    Raises:
      DataError: a malformed line, an unknown or repeated image id, a value other than 0 or 1,
        or an image of images.txt without a line.
    """
    values, line_of = _read_by_image(path, "<is_training_image>", image_ids, images_path)
    for image_id, value in values.items():
        if value not in SPLITS:
            raise DataError(
                f"{path}:{line_of[image_id]}: is_training_image '{value}', expected 1 or 0"
            )
    missing = [i for i in image_ids if i not in values]
    if missing:
        raise DataError(
            f"{path}: image {missing[0]} of {images_path} has no line ({len(missing)} image(s) "
            "missing; expected one line per image)"
        )
    return {image_id: SPLITS[value] for image_id, value in values.items()}


def find_names(root: pathlib.Path) -> pathlib.Path:
    """The attribute-name file: attributes.txt beside CUB_200_2011/, or under its attributes/."""
    return builder_lib.find_one_of(
        root,
        NAME_FILES,
        "the attribute names of CUB_200_2011.tgz, <attribute_id> <attribute_name> a line",
    )


def read_names(path: pathlib.Path) -> list[str]:
    """Attribute names of attributes.txt; the ids must be 1, 2, ... in order.

    Raises:
      DataError: a line without an id and a name, an id out of order, a name listed twice.
    """
    names: list[str] = []
    line_of: dict[str, int] = {}
    for n, fields in _lines(path):
        if len(fields) != 2:
            raise _count_error(path, n, len(fields), "2", "<attribute_id> <attribute_name>")
        attribute_id = _integer(path, n, "attribute id", fields[0])
        if attribute_id != len(names) + 1:
            raise DataError(
                f"{path}:{n}: attribute id {attribute_id}, expected {len(names) + 1} (ids 1, "
                "2, ... in order)"
            )
        if fields[1] in line_of:
            raise DataError(
                f"{path}:{n}: attribute name '{fields[1]}' already on line {line_of[fields[1]]}"
            )
        line_of[fields[1]] = n
        names.append(fields[1])
    if not names:
        raise DataError(f"{path}: no attribute names (expected <attribute_id> <attribute_name>)")
    return names


def read_labels(
    path: pathlib.Path,
    image_ids: dict[int, str],
    num_attributes: int,
    images_path: pathlib.Path,
    names_path: pathlib.Path,
) -> np.ndarray:
    """uint8 [images, attributes]: `is_present` of image_attribute_labels.txt, rows in the order
    of `image_ids` (images.txt's), columns in attribute-id order; every (image, attribute) pair
    exactly once (module docstring for the lines read).

    Raises:
      DataError: naming the file and line (module docstring).
    """
    row = {image_id: r for r, image_id in enumerate(image_ids)}
    labels = np.zeros((len(row), num_attributes), np.uint8)
    # The line of each pair, 0 = not given yet: a repeat names the first, a gap is found after.
    line_of = np.zeros((len(row), num_attributes), np.int32)
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 5:
                raise _count_error(path, n, len(fields), "5", LABEL_FIELDS)
            image_id = _integer(path, n, "image id", fields[0])
            attribute_id = _integer(path, n, "attribute id", fields[1])
            if image_id not in row:
                raise DataError(f"{path}:{n}: image id {image_id} is not in {images_path}")
            if not 1 <= attribute_id <= num_attributes:
                raise DataError(
                    f"{path}:{n}: attribute id {attribute_id} out of range; expected 1.."
                    f"{num_attributes} (the ids of {names_path})"
                )
            present = fields[2]
            if present not in (b"0", b"1"):
                raise DataError(
                    f"{path}:{n}: is_present '{present.decode(errors='replace')}', expected 0 or 1"
                )
            r, c = row[image_id], attribute_id - 1
            if line_of[r, c]:
                raise DataError(
                    f"{path}:{n}: image {image_id}, attribute {attribute_id} already given on "
                    f"line {line_of[r, c]} (expected one line per image and attribute)"
                )
            line_of[r, c] = n
            labels[r, c] = present == b"1"
    gaps = np.argwhere(line_of == 0)
    if len(gaps):
        r, c = gaps[0]
        raise DataError(
            f"{path}: image {list(row)[r]} has no line for attribute {c + 1} ({len(gaps)} "
            "(image, attribute) pair(s) missing; expected one line per image of images.txt and "
            "attribute of attributes.txt)"
        )
    return labels


@dataclasses.dataclass
class CubFiles:
    """What the CUB text files say: images in images.txt order, their split and labels."""

    image_ids: list[int]
    image_names: list[str]
    splits: list[str]  # 'train' or 'test', per image
    labels: np.ndarray  # uint8 [images, attributes]
    class_names: list[str]


def read_files(root: pathlib.Path) -> CubFiles:
    """Every text file of the download, checked against each other (module docstring).

    Raises:
      DataError: a missing or malformed file, named with its line.
    """
    root = check_manual_dir(root)
    names_path = find_names(root)
    class_names = read_names(names_path)
    image_names = read_images(root / IMAGES_TXT)
    split_of = read_split(root / SPLIT_TXT, image_names, root / IMAGES_TXT)
    labels = read_labels(
        root / LABELS_TXT, image_names, len(class_names), root / IMAGES_TXT, names_path
    )
    ids = list(image_names)
    return CubFiles(
        ids, list(image_names.values()), [split_of[i] for i in ids], labels, class_names
    )


def source_order(root: pathlib.Path, split: str):
    """The raw files' image order of `split` the single-positive draws need
    (`observed.SourceOrder`): images.txt's, Cole's rows (format_cub.py:65-75).

    Raises:
      ConfigError: an unknown split.
      DataError: a missing or malformed images.txt or train_test_split.txt, named.
    """
    from mlgraph.data.observed import SourceOrder

    if split not in SPLITS.values():
        raise ConfigError(f"cub split '{split}': expected one of {', '.join(SPLITS.values())}")
    for rel in (IMAGES_TXT, SPLIT_TXT):
        if not (root / rel).is_file():
            raise DataError(f"{root / rel}: not found (the image order of {FOLDER}/)")
    image_names = read_images(root / IMAGES_TXT)
    split_of = read_split(root / SPLIT_TXT, image_names, root / IMAGES_TXT)
    return SourceOrder(image_ids=tuple(i for i in image_names if split_of[i] == split))


class Cub2011(builder_lib.MultiLabelBuilder):
    """CUB-200-2011 attributes as multi-label classification ('train', 'test'; official split),
    as Cole et al. prepare them (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "CUB-200-2011 attributes multi-label: image, is_present multi-hot, image id."
    HOMEPAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
    IMAGE_ID = "int"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download CUB_200_2011.tgz and unpack it into manual_dir, so that it holds "
        "CUB_200_2011/ (images.txt, train_test_split.txt, attributes/, images/) and "
        "attributes.txt."
    )

    @classmethod
    def source_paths(cls, root: pathlib.Path) -> list[pathlib.Path]:
        """The text files read, the image folder and both places of the attribute names."""
        return [root / rel for rel in (*REQUIRED, *NAME_FILES)]

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        files = read_files(root)
        self.info.metadata["class_names"] = files.class_names
        self.info.metadata["skipped"] = {}
        # Images without a present attribute are kept, as Cole's; counted for the summary.
        splits = np.asarray(files.splits)
        empty = ~files.labels.any(axis=1)
        self.info.metadata["no_positive"] = {
            split: int((empty & (splits == split)).sum()) for split in SPLITS.values()
        }
        return {
            split: self._generate_examples(root, split, files, np.flatnonzero(splits == split))
            for split in SPLITS.values()
        }

    def _generate_examples(self, root, split, files: CubFiles, rows):
        skipped = []
        for r in rows:
            image_id = files.image_ids[r]
            try:
                data, _ = images.rgb_jpeg_bytes(
                    root / IMAGE_FOLDER / files.image_names[r], self.max_image_pixels
                )
            except images.BadImage as e:
                if self.strict:
                    raise DataError(f"{e} (--strict)") from None
                skipped.append(str(e))
                continue
            yield image_id, {"image": data, "labels": files.labels[r], "image_id": image_id}
        self.info.metadata["skipped"][split] = skipped

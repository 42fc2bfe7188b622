"""PASCAL VOC 2007 and 2012 as TFDS builders writing array_record (no TensorFlow needed).

Reads `manual_dir` in the layout of the official tar files (the VOC2007 trainval and test tars
unpack into the same folder):

    VOCdevkit/VOC2007/Annotations/<id>.xml
    VOCdevkit/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt
    VOCdevkit/VOC2007/JPEGImages/<id>.jpg

(VOC2012 the same under `VOCdevkit/VOC2012/`, without `test.txt`: its test labels are not
public.) Splits are the image lists of `ImageSets/Main`: VOC2007 'train', 'val', 'trainval'
(5,011 images, the SALGL / SSGRL / ML-GCN training set) and 'test' (4,952, their evaluation set);
VOC2012 'train' (5,717), 'val' (5,823; Cole et al. / Scob evaluate on it) and 'trainval'
(11,540). Images appear in the order of the list files' ids; within a split TFDS stores them in
its own order, so `image_id` is what identifies an image.

Classes are the 20 VOC names in alphabetical order (aeroplane ... tvmonitor). Object names are
lower-cased and stripped, as SALGL's scripts/voc2007.py does. Only an `<object>`'s own `<name>`
counts: the `<part>` names inside person objects (head, hand, foot) are not classes.

Features per image:

* `labels` (uint8 [20]): on the training splits ('train', 'trainval') a class is positive when the
  image has at least one instance of it, difficult ones included (SALGL and ML-GCN train this
  way). On the evaluation splits ('val', 'test') a class is positive only when it has at least
  one non-difficult instance, as in SALGL's test.txt and the VOC devkit.
* `difficult` (uint8 [20]): 1 where the class appears in the image only as difficult objects
  (SALGL's `ignore.npy`, identical on every split). Evaluation drops these (image, class) pairs
  from that class's AP and counts: `mlgraph.metrics` takes `mask=(difficult == 0)`. On a training
  split `labels & ~difficult` gives the labels that drop difficult objects (SSGRL's training
  labels; Cole et al.'s positives).
* `image_id` (text): the VOC id, e.g. "000005" or "2008_000002".

A listed image whose XML is missing, malformed or names an unknown class, or whose JPEG is missing
or unreadable, is reported by path and skipped (`info.metadata['skipped'][split]`), or with
`strict=True` stops the build with a DataError.
"""

from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds

from mlgraph.data import builder_lib, images
from mlgraph.errors import DataError

CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
# Splits on which difficult objects count as positives (SALGL's training convention).
TRAINING_SPLITS = ("train", "trainval")


class AnnotationError(Exception):
    """An annotation XML is missing, malformed or names an unknown class."""


def read_annotation(xml_path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(any-instance multi-hot, non-difficult-instance multi-hot) of one VOC annotation XML."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as e:
        raise AnnotationError(f"{xml_path}: not valid XML ({e})") from None
    any_instance = np.zeros(len(CLASSES), np.uint8)
    clear_instance = np.zeros(len(CLASSES), np.uint8)
    # Direct children only: person objects nest <part><name>head</name></part>.
    for k, obj in enumerate(root.findall("object")):
        name = obj.findtext("name")
        if name is None:
            raise AnnotationError(f"{xml_path}: <object> {k} has no <name>")
        name = name.strip().lower()
        if name not in CLASS_INDEX:
            raise AnnotationError(
                f"{xml_path}: unknown class '{name}' (expected one of the 20 VOC classes: "
                f"{', '.join(CLASSES)})"
            )
        # A missing <difficult> (some VOC2012 files) means not difficult, as in the devkit.
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise AnnotationError(
                f"{xml_path}: <object> {k} ('{name}') has <difficult>{difficult}</difficult>, "
                "expected 0 or 1"
            )
        any_instance[CLASS_INDEX[name]] = 1
        if difficult == "0":
            clear_instance[CLASS_INDEX[name]] = 1
    return any_instance, clear_instance


def read_split_ids(list_path: pathlib.Path) -> list[str]:
    """Image ids of an ImageSets/Main list file (first token of each non-empty line)."""
    return [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]


class VocBase(builder_lib.MultiLabelBuilder, skip_registration=True):
    """Shared reader of one VOC year; subclasses set YEAR and SPLITS."""

    YEAR = ""
    SPLITS: tuple[str, ...] = ()
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "PASCAL VOC multi-label: image, multi-hot labels, difficult-only mask, image id."
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/"
    EXTRA_MULTIHOT = ("difficult",)

    @classmethod
    def devkit(cls, root: pathlib.Path) -> pathlib.Path:
        """The VOC<year> folder inside `root`."""
        return root / "VOCdevkit" / f"VOC{cls.YEAR}"

    @classmethod
    def source_order(cls, root: pathlib.Path, split: str):
        """The raw files' image order of `split` the single-positive draws need
        (`observed.SourceOrder`): ImageSets/Main/<split>.txt's, which Scob's rows follow.

        Raises:
          DataError: the list file is missing.
        """
        from mlgraph.data.observed import SourceOrder

        path = cls.devkit(root) / "ImageSets" / "Main" / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"{path}: image list not found")
        return SourceOrder(image_ids=tuple(read_split_ids(path)))

    @classmethod
    def check_manual_dir(cls, root: str | pathlib.Path) -> pathlib.Path:
        """`root` as a path; a DataError names every VOC file or folder it lacks."""
        base = f"VOCdevkit/VOC{cls.YEAR}"
        return builder_lib.check_manual_dir(
            root,
            f"VOC{cls.YEAR}",
            [f"{base}/Annotations", f"{base}/JPEGImages"]
            + [f"{base}/ImageSets/Main/{split}.txt" for split in cls.SPLITS],
            f"{base}/Annotations/, JPEGImages/, ImageSets/Main/{{{','.join(cls.SPLITS)}}}.txt",
        )

    @classmethod
    def source_paths(cls, root: pathlib.Path) -> list[pathlib.Path]:
        """VOCdevkit/VOC<year>: the other year may share the folder without touching this one."""
        return [cls.devkit(root)]

    def _split_generators(self, dl_manager):
        root = self.check_manual_dir(pathlib.Path(dl_manager.manual_dir))
        self.info.metadata["class_names"] = list(CLASSES)
        self.info.metadata["skipped"] = {}
        return {split: self._generate_examples(root, split) for split in self.SPLITS}

    def _generate_examples(self, root, split):
        base = self.devkit(root)
        skipped = []
        for image_id in read_split_ids(base / "ImageSets" / "Main" / f"{split}.txt"):
            try:
                any_instance, clear_instance = read_annotation(
                    base / "Annotations" / f"{image_id}.xml"
                )
                data, _ = images.rgb_jpeg_bytes(
                    base / "JPEGImages" / f"{image_id}.jpg", self.max_image_pixels
                )
            except (AnnotationError, images.BadImage) as e:
                if self.strict:
                    raise DataError(f"{e} (--strict)") from None
                skipped.append(str(e))
                continue
            labels = any_instance if split in TRAINING_SPLITS else clear_instance
            yield (
                image_id,
                {
                    "image": data,
                    "labels": labels,
                    "difficult": any_instance & (1 - clear_instance),
                    "image_id": image_id,
                },
            )
        self.info.metadata["skipped"][split] = skipped


class Voc2007(VocBase):
    """PASCAL VOC 2007 multi-label classification ('train', 'val', 'trainval', 'test')."""

    YEAR = "2007"
    SPLITS = ("train", "val", "trainval", "test")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar and unpack both into "
        "manual_dir, so that it holds VOCdevkit/VOC2007/{Annotations,ImageSets,JPEGImages}."
    )


class Voc2012(VocBase):
    """PASCAL VOC 2012 multi-label classification ('train', 'val', 'trainval'; test is private)."""

    YEAR = "2012"
    SPLITS = ("train", "val", "trainval")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download VOCtrainval_11-May-2012.tar and unpack it into manual_dir, so that it holds "
        "VOCdevkit/VOC2012/{Annotations,ImageSets,JPEGImages}."
    )

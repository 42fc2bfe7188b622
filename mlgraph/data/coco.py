"""MS-COCO 2014 as a TFDS builder writing array_record (no TensorFlow needed).

Reads `manual_dir` in the COCO-2014 layout:

    annotations/instances_train2014.json   annotations/instances_val2014.json
    train2014/COCO_train2014_*.jpg         val2014/COCO_val2014_*.jpg

Classes are the JSON's categories in category-id order (for real COCO the 80 names person,
bicycle, car, ... toothbrush), so non-contiguous category ids map to indices 0..C-1. Labels are
the set of categories among an image's instances. Config 'nonempty' (the default, as SALGL's
scripts/mscoco.py) skips images without annotations (82,081 train / 40,137 val images);
'all' keeps them with an all-zero label vector.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from mlgraph.data import builder_lib, images
from mlgraph.errors import ConfigError, DataError

SPLITS = {"train": "train2014", "val": "val2014"}


@dataclasses.dataclass
class CocoConfig(tfds.core.BuilderConfig):
    """Whether images without any annotation are kept."""

    keep_empty: bool = False


REQUIRED = [f"annotations/instances_{folder}.json" for folder in SPLITS.values()] + list(
    SPLITS.values()
)


def check_manual_dir(root: str | pathlib.Path) -> pathlib.Path:
    """`root` as a path; a DataError names every COCO-2014 file or folder it lacks."""
    return builder_lib.check_manual_dir(
        root,
        "COCO-2014",
        REQUIRED,
        "annotations/instances_{train,val}2014.json, train2014/, val2014/",
    )


def load_instances(json_path: pathlib.Path) -> dict:
    """An instances JSON as written (every list in file order), checked for its three keys."""
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{json_path}: missing top-level key '{key}'")
    return data


def read_instances(json_path: pathlib.Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(categories sorted by id, images, annotations) of an instances JSON, validated."""
    data = load_instances(json_path)
    return sorted(data["categories"], key=lambda c: c["id"]), data["images"], data["annotations"]


def image_labels(
    images_: list[dict], annotations: list[dict], cat_index: dict[int, int], json_path
) -> dict[int, np.ndarray]:
    """Multi-hot label vector per image id, from the categories of its instances."""
    labels = {im["id"]: np.zeros(len(cat_index), np.uint8) for im in images_}
    for ann in annotations:
        if ann["category_id"] not in cat_index:
            raise DataError(
                f"{json_path}: annotation {ann.get('id')} names unknown category_id "
                f"{ann['category_id']}"
            )
        if ann["image_id"] not in labels:
            raise DataError(
                f"{json_path}: annotation {ann.get('id')} names unknown image_id {ann['image_id']}"
            )
        labels[ann["image_id"]][cat_index[ann["category_id"]]] = 1
    return labels


class Coco2014(builder_lib.MultiLabelBuilder):
    """MS-COCO 2014 multi-label classification (train2014 -> 'train', val2014 -> 'val')."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "MS-COCO 2014 multi-label: image, multi-hot labels, image id."
    HOMEPAGE = "https://cocodataset.org"
    IMAGE_ID = "int"
    BUILDER_CONFIGS = [
        CocoConfig(name="nonempty", description="images without annotations skipped"),
        CocoConfig(
            name="all", description="every image, empty label vectors allowed", keep_empty=True
        ),
    ]
    DEFAULT_CONFIG_NAME = "nonempty"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download train2014.zip, val2014.zip and annotations_trainval2014.zip from "
        "cocodataset.org and unpack them so that manual_dir holds annotations/, train2014/ "
        "and val2014/."
    )

    @classmethod
    def source_paths(cls, root: pathlib.Path) -> list[pathlib.Path]:
        """The two instances JSONs and the two image folders."""
        return [root / entry for entry in REQUIRED]

    def _split_generators(self, dl_manager):
        root = check_manual_dir(pathlib.Path(dl_manager.manual_dir))
        parsed = {
            split: read_instances(root / "annotations" / f"instances_{folder}.json")
            for split, folder in SPLITS.items()
        }
        names = {split: [c["name"] for c in cats] for split, (cats, _, _) in parsed.items()}
        if names["train"] != names["val"]:
            raise DataError(f"{root}/annotations: train and val JSON list different categories")
        self.info.metadata["class_names"] = names["train"]
        self.info.metadata["skipped"] = {}
        return {split: self._generate_examples(root, split, *parsed[split]) for split in SPLITS}

    def _generate_examples(self, root, split, categories, images_, annotations):
        json_path = root / "annotations" / f"instances_{SPLITS[split]}.json"
        cat_index = {c["id"]: i for i, c in enumerate(categories)}
        labels = image_labels(images_, annotations, cat_index, json_path)
        skipped = []
        for im in sorted(images_, key=lambda im: im["id"]):
            y = labels[im["id"]]
            if not y.any() and not self.builder_config.keep_empty:
                continue
            try:
                data, _ = images.rgb_jpeg_bytes(
                    root / SPLITS[split] / im["file_name"], self.max_image_pixels
                )
            except images.BadImage as e:
                if self.strict:
                    raise DataError(f"{e} (--strict)") from None
                skipped.append(str(e))
                continue
            yield im["id"], {"image": data, "labels": y, "image_id": im["id"]}
        self.info.metadata["skipped"][split] = skipped


def source_order(root: pathlib.Path, split: str):
    """The raw files' order of `split` that the single-positive draws need
    (`observed.SourceOrder`): the instances JSON's image order (Scob's rows), category order
    (Cole's classes) and each image's annotations in order (Scob's label sets).

    Raises:
      ConfigError: an unknown split.
      DataError: a missing or malformed annotation file, named.
    """
    from mlgraph.data.observed import SourceOrder

    if split not in SPLITS:
        raise ConfigError(f"coco2014 split '{split}': expected one of {', '.join(SPLITS)}")
    path = root / "annotations" / f"instances_{SPLITS[split]}.json"
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    # Unsorted: Cole's class order and Scob's image order are the file's own.
    doc = load_instances(path)
    names = {c["id"]: c["name"] for c in doc["categories"]}
    annotations: dict[int, list[str]] = {}
    for ann in doc["annotations"]:
        if ann["category_id"] not in names:
            raise DataError(
                f"{path}: annotation {ann.get('id')} names unknown category_id {ann['category_id']}"
            )
        annotations.setdefault(ann["image_id"], []).append(names[ann["category_id"]])
    return SourceOrder(
        image_ids=tuple(im["id"] for im in doc["images"]),
        class_names=tuple(c["name"] for c in doc["categories"]),
        annotations={k: tuple(v) for k, v in annotations.items()},
    )

"""A small COCO-2014-layout folder made from scikit-image photographs, for builder tests."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image
from skimage import data as skdata

# Non-contiguous ids, as in real COCO, listed out of order on purpose.
CATEGORIES = [
    {"id": 7, "name": "train", "supercategory": "vehicle"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 4, "name": "motorcycle", "supercategory": "vehicle"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
]


def write_coco(root: pathlib.Path, labels_per_split: dict[str, list[list[int]]]) -> pathlib.Path:
    """Write images and instances JSON; labels are lists of category ids per image."""
    photos = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
    (root / "annotations").mkdir(parents=True)
    image_id, ann_id = 100, 1
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        (root / folder).mkdir()
        images, anns = [], []
        for i, cats in enumerate(labels_per_split[split]):
            image_id += 3  # non-contiguous image ids too
            name = f"COCO_{folder}_{image_id:012d}.jpg"
            photo = photos[i % len(photos)][:96, :128]
            Image.fromarray(np.ascontiguousarray(photo)).save(root / folder / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": 96, "width": 128})
            for c in cats:
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": c,
                        "bbox": [1, 1, 10, 10],
                        "area": 100.0,
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
        doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(doc))
    return root

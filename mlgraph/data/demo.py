"""The embedded data sets: multi-label images built from real photographs shipped in packages.

Nothing is downloaded. Two data sets are composed at run time from a fixed seed and written in
the real MS-COCO 2014 file layout, so that the production COCO builder and pipeline read them:

    root/annotations/instances_train2014.json   root/annotations/instances_val2014.json
    root/train2014/COCO_train2014_{id:012d}.jpg root/val2014/COCO_val2014_{id:012d}.jpg

* ``demo`` (:func:`write_demo`): 13 classes with real names (person, motorcycle, cat, horse, cup,
  book, clock, building, flower, coin, rocket, moon, galaxy) cut from photographs in
  scikit-image, scikit-learn and matplotlib. Every image belongs to one of four scenes
  (street, home, space, nature) with its own background (a tinted texture photo) and its own
  class distribution, so label co-occurrence depends on the scene, as in SALGL's setting.
  Category ids are COCO's where the class exists in COCO and are non-contiguous, so loaders
  must map ids to indices in sorted-id order. Each image entry has an extra ``"scene"`` field
  (an index into ``root/scenes.json``'s ``"scenes"``).
* ``digits-mosaic`` (:func:`write_digits_mosaic`): 2x2 mosaics of scikit-learn's 8x8 digits,
  32x32 RGB, 10 classes "zero".."nine"; train and test use disjoint digit samples. Small enough
  for "does training learn" tests.

:func:`ensure_demo` writes a data set once into a cache folder (atomically) and returns its path.
Image ``i`` of a split depends only on (seed, split, i), so a smaller data set is a prefix of a
larger one with the same seed, and the bytes written are the same on every run.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import io
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from mlgraph.errors import DataError

VERSION = 1
JPEG_QUALITY = 90
SPLIT_FOLDERS = {"train": "train2014", "val": "val2014"}
_SPLIT_CODE = {"train": 0, "val": 1}  # part of each image's seed, so the splits never share crops
SCENES = ("street", "home", "space", "nature")
NUM_LABELS_PROBS = (0.2, 0.35, 0.3, 0.15)  # P(1..4 objects in an image)
OBJECT_SIDE = (0.35, 0.6)  # longer side of a pasted object, as a fraction of the image side
MIN_VISIBLE = 0.6  # every pasted object keeps at least this fraction of its pixels visible


@dataclasses.dataclass(frozen=True)
class DemoClass:
    """One class of the photo demo: COCO-style category and the photos it is cut from.

    ``sources`` holds (photo key, region of interest (x0, y0, x1, y1) in source pixels); crops
    are taken inside the region so that they show the object rather than the photo's margins.
    """

    name: str
    category_id: int
    supercategory: str
    sources: tuple[tuple[str, tuple[int, int, int, int]], ...]


# In category-id order, which is the class-index order every loader uses. Ids of classes that
# are COCO classes are COCO's; the others take even ids above COCO's 90, so ids have gaps.
_CLASS_TABLE = (
    DemoClass(
        "person",
        1,
        "person",
        (
            ("astronaut", (40, 0, 390, 512)),
            ("camera", (40, 20, 360, 512)),
            ("grace_hopper", (30, 50, 490, 600)),
        ),
    ),
    DemoClass(
        "motorcycle",
        4,
        "vehicle",
        (("motorcycle_left", (60, 140, 590, 500)), ("motorcycle_right", (40, 140, 570, 500))),
    ),
    DemoClass("cat", 17, "animal", (("chelsea", (0, 0, 451, 300)),)),
    DemoClass("horse", 19, "animal", (("horse", (0, 0, 400, 328)),)),
    DemoClass("cup", 47, "kitchen", (("coffee", (60, 10, 540, 400)),)),
    DemoClass("book", 84, "indoor", (("page", (0, 0, 384, 191)),)),
    DemoClass("clock", 85, "indoor", (("clock", (110, 60, 320, 260)),)),
    DemoClass("building", 92, "outdoor", (("china", (20, 0, 380, 427)),)),
    DemoClass("flower", 94, "plant", (("flower", (90, 60, 380, 390)),)),
    DemoClass("coin", 96, "object", (("coins", (0, 0, 384, 303)),)),
    DemoClass("rocket", 98, "vehicle", (("rocket", (180, 40, 460, 427)),)),
    DemoClass("moon", 100, "sky", (("moon", (0, 0, 512, 512)),)),
    DemoClass("galaxy", 102, "sky", (("hubble_deep_field", (0, 0, 1000, 872)),)),
)
DEMO_CLASSES: tuple[str, ...] = tuple(c.name for c in _CLASS_TABLE)
DEMO_CATEGORIES: list[dict] = [
    {"id": c.category_id, "name": c.name, "supercategory": c.supercategory} for c in _CLASS_TABLE
]

# Relative class weights per scene (unlisted classes get 0.1, so no pair is impossible).
_SCENE_WEIGHTS = {
    "street": {"person": 5, "motorcycle": 5, "building": 4, "coin": 2, "clock": 1, "cup": 1,
               "cat": 1, "horse": 0.5, "flower": 0.5, "book": 0.3, "rocket": 0.2, "moon": 0.2},
    "home": {"cat": 5, "cup": 5, "clock": 4, "book": 4, "person": 3, "coin": 2, "flower": 1.5,
             "motorcycle": 0.3, "building": 0.2, "horse": 0.2},
    "space": {"rocket": 5, "galaxy": 5, "moon": 5, "person": 2, "clock": 0.3, "coin": 0.3},
    "nature": {"horse": 5, "flower": 5, "person": 2, "building": 1.5, "cat": 1, "moon": 1,
               "motorcycle": 0.5, "cup": 0.3, "book": 0.3, "galaxy": 0.3, "coin": 0.2},
}  # fmt: skip

# Background per scene: texture photos and the (dark, light) colours their gray levels map to.
_SCENE_BACKGROUNDS = {
    "street": (("gravel", "brick"), (40, 42, 50), (175, 175, 182)),
    "home": (("brick", "gravel"), (90, 55, 30), (235, 210, 170)),
    "space": (("gravel",), (0, 0, 6), (28, 30, 62)),
    "nature": (("grass",), (18, 55, 12), (140, 205, 90)),
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TRAIN_POOL = (0, 1200)  # digit sample indices [start, stop) used for train mosaics
DIGITS_TEST_POOL = (1200, 1797)
DIGITS_SIZE = 32

_DEFAULTS = {
    "demo": {"num_train": 2000, "num_test": 500, "image_size": 128, "seed": 0},
    "digits-mosaic": {"num_train": 1200, "num_test": 400, "seed": 0},
}
DEMO_NAMES = tuple(_DEFAULTS)


def scene_class_probs() -> np.ndarray:
    """[len(SCENES), len(DEMO_CLASSES)] float64: each scene's probability over classes."""
    w = np.array(
        [[_SCENE_WEIGHTS[s].get(c, 0.1) for c in DEMO_CLASSES] for s in SCENES], np.float64
    )
    return w / w.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- source photos


def _package_dir(package: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed; the demo data sets need it")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _read_photo(path: pathlib.Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: photo shipped with the installed package is missing")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


@functools.cache
def _photos() -> dict[str, Image.Image]:
    """Every source photo as an RGB PIL image, keyed by the names the tables use."""
    from skimage import data as sd

    horse = ~sd.horse()  # the silhouette is False on the horse
    # a dark-brown horse on a pale ground reads as an animal rather than a stencil
    horse_rgb = np.where(horse[:, :, None], [[[92, 58, 36]]], [[[236, 230, 214]]]).astype(np.uint8)
    moto = sd.stereo_motorcycle()
    sklearn_images = _package_dir("sklearn") / "datasets" / "images"
    mpl_data = _package_dir("matplotlib") / "mpl-data" / "sample_data"
    arrays = {
        "astronaut": sd.astronaut(),
        "camera": sd.camera(),
        "grace_hopper": _read_photo(mpl_data / "grace_hopper.jpg"),
        "motorcycle_left": moto[0],
        "motorcycle_right": moto[1],
        "chelsea": sd.chelsea(),
        "horse": horse_rgb,
        "coffee": sd.coffee(),
        "page": sd.page(),
        "clock": sd.clock(),
        "china": _read_photo(sklearn_images / "china.jpg"),
        "flower": _read_photo(sklearn_images / "flower.jpg"),
        "coins": sd.coins(),
        "rocket": sd.rocket(),
        "moon": sd.moon(),
        "hubble_deep_field": sd.hubble_deep_field(),
        "grass": sd.grass(),
        "gravel": sd.gravel(),
        "brick": sd.brick(),
    }
    return {k: Image.fromarray(_rgb(v)) for k, v in arrays.items()}


# ----------------------------------------------------------------------------- composition


@dataclasses.dataclass
class DemoObject:
    """One pasted object: class index (into DEMO_CLASSES), box and visible pixel count."""

    class_index: int
    bbox: tuple[int, int, int, int]  # x, y, w, h in image pixels
    visible: int
    source: str


@dataclasses.dataclass
class DemoImage:
    """A composed image (uint8 [H, W, 3]), its scene index and its objects."""

    pixels: np.ndarray
    scene: int
    objects: list[DemoObject]

    @property
    def label_set(self) -> frozenset[str]:
        """Names of the classes present."""
        return frozenset(DEMO_CLASSES[o.class_index] for o in self.objects)


def _background(rng: np.random.Generator, scene: str, size: int, photos) -> np.ndarray:
    textures, dark, light = _SCENE_BACKGROUNDS[scene]
    tex = photos[textures[rng.integers(len(textures))]]
    side = int(rng.uniform(0.3, 1.0) * min(tex.size))
    x0 = int(rng.integers(0, tex.size[0] - side + 1))
    y0 = int(rng.integers(0, tex.size[1] - side + 1))
    g = np.asarray(
        tex.resize(
            (size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0
        )
    )
    g = g[:, :, :1].astype(np.float32) / 255.0
    img = (1.0 - g) * np.float32(dark) + g * np.float32(light)
    if scene == "nature":  # sky above a horizon, so nature differs from a plain green field
        horizon = int(rng.uniform(0.2, 0.45) * size)
        t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None, None]
        img[:horizon] = (1 - t) * np.float32((90, 150, 225)) + t * np.float32((185, 215, 240))
    elif scene == "space":  # scattered stars
        n = int(rng.integers(size // 4, size // 2))
        ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
        img[ys, xs] = rng.uniform(150, 255, (n, 1)).astype(np.float32)
    return img


def _object_patch(
    rng: np.random.Generator, cls: DemoClass, size: int, photos
) -> tuple[np.ndarray, str]:
    key, (rx0, ry0, rx1, ry1) = cls.sources[rng.integers(len(cls.sources))]
    rw, rh = rx1 - rx0, ry1 - ry0
    cw = int(round(rw * rng.uniform(0.5, 1.0)))
    ch = int(round(rh * rng.uniform(0.5, 1.0)))
    cx = rx0 + int(rng.integers(0, rw - cw + 1))
    cy = ry0 + int(rng.integers(0, rh - ch + 1))
    longer = rng.uniform(*OBJECT_SIDE) * size
    scale = longer / max(cw, ch)
    w = max(8, min(size, int(round(cw * scale))))
    h = max(8, min(size, int(round(ch * scale))))
    patch = photos[key].resize(
        (w, h), Image.BILINEAR, box=(cx, cy, cx + cw, cy + ch), reducing_gap=2.0
    )
    patch = np.asarray(patch, np.float32)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = patch * np.float32(rng.uniform(0.85, 1.15))  # brightness jitter
    return patch, key


def _place(rng: np.random.Generator, owner: np.ndarray, w: int, h: int, tries: int = 40):
    """Top-left corner for a w x h box that leaves every earlier object enough visible pixels.

    Returns the first candidate that keeps MIN_VISIBLE of each earlier object's pixels, else
    the candidate whose worst-hit object keeps the most.
    """
    size = owner.shape[0]
    counts = np.bincount(owner.ravel(), minlength=owner.max() + 1)[1:]
    best, best_score = None, -1.0
    for _ in range(tries):
        x = int(rng.integers(0, size - w + 1))
        y = int(rng.integers(0, size - h + 1))
        if not counts.size:
            return x, y
        covered = np.bincount(owner[y : y + h, x : x + w].ravel(), minlength=counts.size + 1)[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            left = np.where(counts > 0, 1.0 - covered / np.maximum(counts, 1), 1.0)
        score = float(left.min())
        if score >= MIN_VISIBLE:
            return x, y
        if score > best_score:
            best, best_score = (x, y), score
    return best


def compose_image(
    rng: np.random.Generator, image_size: int = 128, probs: np.ndarray | None = None
) -> DemoImage:
    """Compose one demo image: a scene, its background and 1-4 distinct objects of its classes.

    ``owner`` tracks which object each pixel shows, so the recorded visible areas are exact
    and later objects never hide more than 1 - MIN_VISIBLE of an earlier one (if the layout
    allows).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    probs = scene_class_probs() if probs is None else probs
    photos = _photos()
    scene = int(rng.integers(len(SCENES)))
    img = _background(rng, SCENES[scene], image_size, photos)
    k = int(rng.choice(len(NUM_LABELS_PROBS), p=NUM_LABELS_PROBS)) + 1
    classes = rng.choice(len(DEMO_CLASSES), size=k, replace=False, p=probs[scene])
    owner = np.zeros((image_size, image_size), np.int32)
    placed: list[tuple[int, tuple[int, int, int, int], str]] = []
    for n, ci in enumerate(classes, start=1):
        patch, key = _object_patch(rng, _CLASS_TABLE[int(ci)], image_size, photos)
        h, w = patch.shape[:2]
        x, y = _place(rng, owner, w, h)
        img[y : y + h, x : x + w] = patch
        owner[y : y + h, x : x + w] = n
        placed.append((int(ci), (x, y, w, h), key))
    visible = np.bincount(owner.ravel(), minlength=len(placed) + 1)[1:]
    objects = [
        DemoObject(ci, box, int(vis), key)
        for (ci, box, key), vis in zip(placed, visible, strict=True)
    ]
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return DemoImage(pixels, scene, objects)


def iter_demo_split(
    split: str, num_images: int, *, image_size: int = 128, seed: int = 0
) -> Iterator[DemoImage]:
    """The images of one demo split ('train' or 'val'); image i depends on (seed, split, i)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_CODE)}, got '{split}'")
    probs = scene_class_probs()
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        yield compose_image(rng, image_size, probs)


# ----------------------------------------------------------------------------- writing


def _jpeg_bytes(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _coco_id(split: str, index: int) -> int:
    """Id of the index-th image (or annotation) of a split: odd in train, even in val.

    Ids are sparse and disjoint between the splits, as in real COCO, and do not depend on the
    size of the other split, so a smaller set's files are a prefix of a larger one's.
    """
    return 2 * index + 1 + _SPLIT_CODE[split]


def _write_split(
    root: pathlib.Path,
    split: str,
    entries: Iterator[tuple[np.ndarray, list[tuple[int, list[float], float]], dict]],
    categories: list[dict],
    description: str,
    quality: int = JPEG_QUALITY,
) -> None:
    """Write JPEGs and the instances JSON of one split.

    ``entries`` yields (pixels, [(category_id, bbox, area)], extra image fields).
    """
    folder = SPLIT_FOLDERS[split]
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images_, annotations = [], []
    for i, (pixels, anns, extra) in enumerate(entries):
        image_id = _coco_id(split, i)
        file_name = f"COCO_{folder}_{image_id:012d}.jpg"
        (root / folder / file_name).write_bytes(_jpeg_bytes(pixels, quality))
        h, w = pixels.shape[:2]
        images_.append({"id": image_id, "file_name": file_name, "width": w, "height": h, **extra})
        for category_id, bbox, area in anns:
            annotations.append(
                {
                    "id": _coco_id(split, len(annotations)),
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    doc = {
        "info": {"description": description, "version": str(VERSION), "year": 2014},
        "licenses": [],
        "images": images_,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(doc))


def _check_counts(num_train: int, num_test: int) -> None:
    for key, n in (("num_train", num_train), ("num_test", num_test)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{key} must be a positive int, got {n!r}")


def write_demo(
    root: str | pathlib.Path,
    *,
    num_train: int = 2000,
    num_test: int = 500,
    image_size: int = 128,
    seed: int = 0,
) -> pathlib.Path:
    """Write the photo demo (scenes, 13 real classes) in the COCO-2014 layout under ``root``.

    Train goes to ``train2014`` / ``instances_train2014.json``, test to ``val2014`` /
    ``instances_val2014.json``. ``root/scenes.json`` names the scenes that the images'
    ``"scene"`` field indexes, with each scene's class probabilities. Same seed, same bytes.
    """
    _check_counts(num_train, num_test)
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cat_ids = [c.category_id for c in _CLASS_TABLE]

    def entries(split: str, n: int):
        for im in iter_demo_split(split, n, image_size=image_size, seed=seed):
            anns = [
                (cat_ids[o.class_index], [float(v) for v in o.bbox], float(o.visible))
                for o in im.objects
            ]
            yield im.pixels, anns, {"scene": im.scene}

    description = f"mlgraph photo demo v{VERSION} (seed {seed}, {image_size}px)"
    _write_split(root, "train", entries("train", num_train), DEMO_CATEGORIES, description)
    _write_split(root, "val", entries("val", num_test), DEMO_CATEGORIES, description)
    scenes = {
        "scenes": list(SCENES),
        "classes": list(DEMO_CLASSES),
        "class_probabilities": np.round(scene_class_probs(), 6).tolist(),
    }
    (root / "scenes.json").write_text(json.dumps(scenes, indent=1))
    return root


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, read from its CSV without importing sklearn.

    Returns (uint8 [1797, 8, 8] with values 0..16, int64 [1797] labels).
    """
    path = _package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: scikit-learn's digits file is missing")
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",")
    if raw.shape != (1797, 65):
        raise DataError(f"{path}: expected 1797 rows of 65 values, got shape {raw.shape}")
    return raw[:, :64].reshape(-1, 8, 8).astype(np.uint8), raw[:, 64].astype(np.int64)


def compose_mosaic(
    rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, pool: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A 32x32 RGB 2x2 mosaic with 1-4 cells filled from digits[pool[0]:pool[1]].

    Returns (pixels, [(digit, row, col)] in cell order); a digit may appear in two cells.
    """
    k = int(rng.integers(1, 5))
    cells = rng.choice(4, size=k, replace=False)
    picks = rng.integers(pool[0], pool[1], size=k)
    grid = np.zeros((16, 16), np.float32)
    placed = []
    for cell, idx in zip(cells, picks, strict=True):
        r, c = divmod(int(cell), 2)
        grid[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = digits[idx]
        placed.append((int(labels[idx]), r, c))
    scale = DIGITS_SIZE // 16
    gray = np.kron(grid * (255.0 / 16.0), np.ones((scale, scale), np.float32))
    pixels = np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return pixels, sorted(placed, key=lambda t: (t[1], t[2]))


def write_digits_mosaic(
    root: str | pathlib.Path, *, num_train: int = 1200, num_test: int = 400, seed: int = 0
) -> pathlib.Path:
    """Write the digits-mosaic set (10 classes "zero".."nine", ids 1..10) in COCO-2014 layout.

    Train mosaics use digit samples 0..1199 only, test mosaics 1200..1796, so no digit image
    is shared between the splits.
    """
    _check_counts(num_train, num_test)
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    digits, labels = load_digits()
    categories = [
        {"id": i + 1, "name": n, "supercategory": "digit"} for i, n in enumerate(DIGIT_NAMES)
    ]
    cell = DIGITS_SIZE // 2

    def entries(split: str, n: int, pool: tuple[int, int]):
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
            pixels, placed = compose_mosaic(rng, digits, labels, pool)
            anns = [
                (
                    d + 1,
                    [float(cell * c), float(cell * r), float(cell), float(cell)],
                    float(cell * cell),
                )
                for d, r, c in placed
            ]
            yield pixels, anns, {}

    description = f"mlgraph digits mosaic v{VERSION} (seed {seed})"
    # high quality: the 2x-upscaled digits have hard edges that JPEG would otherwise smear
    for split, n, pool in (
        ("train", num_train, DIGITS_TRAIN_POOL),
        ("val", num_test, DIGITS_TEST_POOL),
    ):
        _write_split(root, split, entries(split, n, pool), categories, description, quality=95)
    return root


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> pathlib.Path:
    """``$MLGRAPH_CACHE`` if set, else ``~/.cache/mlgraph``."""
    env = os.environ.get("MLGRAPH_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "mlgraph"


def cache_folder_name(name: str) -> str:
    """Folder name of a cached data set: its name, the generator version and its parameters."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown demo data set '{name}'; valid names: {', '.join(DEMO_NAMES)}")
    p = _DEFAULTS[name]
    size = f"-{p['image_size']}px" if "image_size" in p else ""
    return f"{name}-v{VERSION}-{p['num_train']}x{p['num_test']}{size}-seed{p['seed']}"


def ensure_demo(name: str = "demo", cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Path of the embedded data set ``name`` ('demo' or 'digits-mosaic'), written on first use.

    The set is written into a temporary folder beside the final one and renamed into place,
    so an interrupted run never leaves a folder that looks complete; later calls reuse it.
    """
    final = pathlib.Path(cache_dir or default_cache_dir()) / cache_folder_name(name)
    if final.is_dir():
        missing = [
            f"annotations/instances_{f}.json"
            for f in SPLIT_FOLDERS.values()
            if not (final / "annotations" / f"instances_{f}.json").is_file()
        ]
        if missing:
            raise DataError(
                f"{final}: cached data set is incomplete (missing {', '.join(missing)}); "
                "delete the folder to rebuild it"
            )
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        writer = write_demo if name == "demo" else write_digits_mosaic
        writer(tmp, **_DEFAULTS[name])
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary user data
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- statistics


def _read_split(root: pathlib.Path, split: str) -> dict:
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_FOLDERS)}, got '{split}'")
    path = root / "annotations" / f"instances_{SPLIT_FOLDERS[split]}.json"
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise DataError(f"{path}: missing top-level key '{key}'")
    return doc


def image_label_sets(root: str | pathlib.Path, split: str) -> dict[int, frozenset[str]]:
    """Image id -> set of class names among its annotations, for one split ('train'/'val')."""
    return _label_sets(_read_split(pathlib.Path(root), split))


def _label_sets(doc: dict) -> dict[int, frozenset[str]]:
    names = {c["id"]: c["name"] for c in doc["categories"]}
    sets: dict[int, set[str]] = {im["id"]: set() for im in doc["images"]}
    for ann in doc["annotations"]:
        sets[ann["image_id"]].add(names[ann["category_id"]])
    return {k: frozenset(v) for k, v in sets.items()}


def label_cardinality(root: str | pathlib.Path, split: str) -> float:
    """Mean number of distinct labels per image of a split ('train'/'val')."""
    sets = image_label_sets(root, split)
    return float(np.mean([len(s) for s in sets.values()])) if sets else 0.0


def summary(root: str | pathlib.Path) -> dict:
    """Statistics of a written data set.

    Returns ``{"classes": names in category-id order, "scenes": names (empty without
    scenes.json), "splits": {"train"|"val": {"images", "mean_labels", "per_scene",
    "per_class"}}}``; per-scene and per-class values count images.
    """
    root = pathlib.Path(root)
    scenes_path = root / "scenes.json"
    scene_names = json.loads(scenes_path.read_text())["scenes"] if scenes_path.is_file() else []
    out: dict = {"classes": [], "scenes": scene_names, "splits": {}}
    for split in SPLIT_FOLDERS:
        doc = _read_split(root, split)
        out["classes"] = [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
        sets = _label_sets(doc)
        per_scene = dict.fromkeys(scene_names, 0)
        for im in doc["images"]:
            if "scene" in im:
                per_scene[scene_names[im["scene"]]] += 1
        out["splits"][split] = {
            "images": len(sets),
            "mean_labels": float(np.mean([len(s) for s in sets.values()])) if sets else 0.0,
            "per_scene": per_scene,
            "per_class": {n: sum(n in s for s in sets.values()) for n in out["classes"]},
        }
    return out

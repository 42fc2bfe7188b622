"""The embedded data sets: COCO-2014 layout, labels read back, scenes, determinism, cache."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mlgraph.data import demo
from mlgraph.errors import DataError


def read_label_sets(json_path: pathlib.Path) -> dict[int, frozenset[str]]:
    """Image id -> class names, read with pycocotools when installed, else with plain json."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        doc = json.loads(json_path.read_text())
        names = {c["id"]: c["name"] for c in doc["categories"]}
        sets = {im["id"]: set() for im in doc["images"]}
        for a in doc["annotations"]:
            sets[a["image_id"]].add(names[a["category_id"]])
        return {k: frozenset(v) for k, v in sets.items()}
    coco = COCO(str(json_path))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    return {
        i: frozenset(names[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds(imgIds=[i])))
        for i in coco.getImgIds()
    }


def all_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> pathlib.Path:
    return demo.write_demo(tmp_path_factory.mktemp("small"), num_train=60, num_test=20)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> pathlib.Path:
    return demo.write_demo(tmp_path_factory.mktemp("medium"), num_train=300, num_test=20)


def test_classes_and_category_ids():
    assert len(demo.DEMO_CLASSES) >= 12
    assert demo.DEMO_CLASSES == (
        "person", "motorcycle", "cat", "horse", "cup", "book", "clock", "building", "flower",
        "coin", "rocket", "moon", "galaxy",
    )  # fmt: skip
    ids = [c["id"] for c in demo.DEMO_CATEGORIES]
    assert ids == [1, 4, 17, 19, 47, 84, 85, 92, 94, 96, 98, 100, 102]
    assert ids == sorted(ids) and ids != list(range(1, len(ids) + 1))  # sorted, with gaps


def test_source_regions_lie_inside_their_photos():
    photos = demo._photos()
    keys = set()
    for cls in demo._CLASS_TABLE:
        for key, (x0, y0, x1, y1) in cls.sources:
            w, h = photos[key].size
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (cls.name, key, (w, h))
            keys.add(key)
    assert len([k for c in demo._CLASS_TABLE if c.name == "person" for k in c.sources]) == 3
    assert photos["astronaut"].size == (512, 512) and photos["grace_hopper"].size == (512, 600)
    assert len(keys) == 16


def test_layout_files(small):
    assert sorted(p.name for p in (small / "annotations").iterdir()) == [
        "instances_train2014.json",
        "instances_val2014.json",
    ]
    train = sorted(p.name for p in (small / "train2014").iterdir())
    val = sorted(p.name for p in (small / "val2014").iterdir())
    assert len(train) == 60 and len(val) == 20
    assert train[0] == "COCO_train2014_000000000001.jpg"
    assert train[-1] == "COCO_train2014_000000000119.jpg"
    assert val[0] == "COCO_val2014_000000000002.jpg"
    scenes = json.loads((small / "scenes.json").read_text())
    assert scenes["scenes"] == ["street", "home", "space", "nature"]
    assert scenes["classes"] == list(demo.DEMO_CLASSES)
    np.testing.assert_allclose(np.sum(scenes["class_probabilities"], axis=1), 1.0, atol=1e-5)
    with Image.open(small / "train2014" / train[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (128, 128))


def test_coco_schema(small):
    doc = json.loads((small / "annotations" / "instances_train2014.json").read_text())
    assert doc["categories"] == demo.DEMO_CATEGORIES
    assert set(doc["images"][0]) == {"id", "file_name", "width", "height", "scene"}
    assert set(doc["annotations"][0]) == {
        "id",
        "image_id",
        "category_id",
        "bbox",
        "area",
        "iscrowd",
    }
    ann_ids = [a["id"] for a in doc["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H
        assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
        # a box's longer side is 35%-60% of the image side (rounding to whole pixels aside)
        assert 0.35 * 128 - 1 <= max(w, h) <= 0.6 * 128 + 1
    val = json.loads((small / "annotations" / "instances_val2014.json").read_text())
    assert not {im["id"] for im in val["images"]} & set(sizes)  # disjoint image ids


def test_labels_read_back_match_generator(small):
    for split, n in (("train", 60), ("val", 20)):
        folder = demo.SPLIT_FOLDERS[split]
        read = read_label_sets(small / "annotations" / f"instances_{folder}.json")
        doc = json.loads((small / "annotations" / f"instances_{folder}.json").read_text())
        composed = list(demo.iter_demo_split(split, n, seed=0))
        assert len(read) == n
        for im, c in zip(doc["images"], composed, strict=True):
            assert read[im["id"]] == c.label_set
            assert 1 <= len(read[im["id"]]) <= 4
            assert im["scene"] == c.scene
            # the JPEG on disk is the composed image (up to JPEG loss)
            with Image.open(small / folder / im["file_name"]) as f:
                pixels = np.asarray(f, np.float32)
            assert np.abs(pixels - c.pixels).mean() < 8.0  # other images differ by 25-100
        assert demo.image_label_sets(small, split) == read


def test_objects_are_distinct_and_visible():
    for im in demo.iter_demo_split("train", 40, seed=3):
        idx = [o.class_index for o in im.objects]
        assert len(idx) == len(set(idx)) and 1 <= len(idx) <= 4
        # the newest object is never covered; earlier ones keep most of their pixels
        last = im.objects[-1]
        assert last.visible == last.bbox[2] * last.bbox[3]
        for o in im.objects:
            assert o.visible >= 0.3 * o.bbox[2] * o.bbox[3]


def test_scenes_drive_label_distribution(medium):
    probs = demo.scene_class_probs()
    assert probs.shape == (4, len(demo.DEMO_CLASSES))
    doc = json.loads((medium / "annotations" / "instances_train2014.json").read_text())
    sets = demo.image_label_sets(medium, "train")
    freq = np.zeros((4, len(demo.DEMO_CLASSES)))
    counts = np.zeros(4)
    for im in doc["images"]:
        counts[im["scene"]] += 1
        for name in sets[im["id"]]:
            freq[im["scene"], demo.DEMO_CLASSES.index(name)] += 1
    assert (counts >= 40).all()  # all four scenes occur
    freq /= counts[:, None]  # P(class present | scene), measured
    tv = 0.5 * np.abs(freq[:, None] - freq[None]).sum(-1) / freq.sum(-1).mean()
    off_diag = tv[~np.eye(4, dtype=bool)]
    assert off_diag.min() > 0.3, tv
    space, home = demo.SCENES.index("space"), demo.SCENES.index("home")
    for name in ("rocket", "galaxy", "moon"):
        c = demo.DEMO_CLASSES.index(name)
        assert freq[space, c] > 0.4 and freq[home, c] < 0.1, (name, freq[:, c])
    cat = demo.DEMO_CLASSES.index("cat")
    assert freq[home, cat] > 3 * freq[space, cat]


def test_mean_labels_per_image(medium):
    s = demo.summary(medium)
    train = s["splits"]["train"]
    assert train["images"] == 300 and s["splits"]["val"]["images"] == 20
    assert 1.5 <= train["mean_labels"] <= 3.5
    assert train["mean_labels"] == demo.label_cardinality(medium, "train")
    assert sum(train["per_scene"].values()) == 300
    assert list(train["per_scene"]) == list(demo.SCENES)
    assert s["classes"] == list(demo.DEMO_CLASSES)
    sets = demo.image_label_sets(medium, "train")
    assert train["per_class"]["person"] == sum("person" in v for v in sets.values()) > 0
    assert sum(train["per_class"].values()) == sum(len(v) for v in sets.values())


def test_deterministic_bytes_and_prefix(small, medium, tmp_path):
    again = demo.write_demo(tmp_path / "again", num_train=60, num_test=20)
    a, b = all_bytes(small), all_bytes(again)
    assert a.keys() == b.keys() and len(a) == 60 + 20 + 3
    assert a == b
    # image i depends only on (seed, split, i): the small set's JPEGs are the medium set's first
    m = all_bytes(medium)
    jpegs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] == m[k] for k in jpegs)
    other = all_bytes(demo.write_demo(tmp_path / "other", num_train=5, num_test=1, seed=1))
    name = "train2014/COCO_train2014_000000000001.jpg"
    assert other[name] != a[name]


def test_image_size_parameter(tmp_path):
    root = demo.write_demo(tmp_path, num_train=3, num_test=1, image_size=64)
    with Image.open(root / "val2014" / "COCO_val2014_000000000002.jpg") as im:
        assert im.size == (64, 64)
    with pytest.raises(ValueError, match="image_size must be at least 32 pixels, got 16"):
        demo.write_demo(tmp_path / "tiny", num_train=1, num_test=1, image_size=16)
    with pytest.raises(ValueError, match="num_test must be a positive int, got 0"):
        demo.write_demo(tmp_path / "none", num_train=1, num_test=0)


def test_digits_mosaic(tmp_path):
    root = demo.write_digits_mosaic(tmp_path, num_train=40, num_test=20)
    doc = json.loads((root / "annotations" / "instances_train2014.json").read_text())
    assert [c["name"] for c in doc["categories"]] == list(demo.DIGIT_NAMES)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
    read = read_label_sets(root / "annotations" / "instances_val2014.json")
    assert len(read) == 20 and all(1 <= len(v) <= 4 for v in read.values())
    with Image.open(root / "train2014" / doc["images"][0]["file_name"]) as im:
        assert (im.mode, im.size) == ("RGB", (32, 32))
        px = np.asarray(im, np.float32)
    # the label set read back is the set of digits the generator placed, in cells of 16 px
    digits, labels = demo.load_digits()
    rng = np.random.default_rng([0, 0, 0])
    pixels, placed = demo.compose_mosaic(rng, digits, labels, demo.DIGITS_TRAIN_POOL)
    assert np.abs(px - pixels).mean() < 3.0
    first = [a for a in doc["annotations"] if a["image_id"] == doc["images"][0]["id"]]
    assert [(a["category_id"] - 1, a["bbox"]) for a in first] == [
        (d, [16.0 * c, 16.0 * r, 16.0, 16.0]) for d, r, c in placed
    ]


def test_digits_mosaic_splits_use_disjoint_digits():
    digits, labels = demo.load_digits()
    assert (
        digits.shape == (1797, 8, 8)
        and digits.max() == 16
        and labels[:10].tolist() == list(range(10))
    )
    scaled = np.repeat(np.repeat(digits.astype(np.float32) * (255 / 16), 2, 1), 2, 2)
    scaled = np.rint(scaled).astype(np.uint8)
    for split, (lo, hi) in (("train", demo.DIGITS_TRAIN_POOL), ("val", demo.DIGITS_TEST_POOL)):
        code = 0 if split == "train" else 1
        for i in range(10):
            rng = np.random.default_rng([0, code, i])
            pixels, placed = demo.compose_mosaic(rng, digits, labels, (lo, hi))
            filled = {(r, c) for _, r, c in placed}
            for r in range(2):
                for c in range(2):
                    cell = pixels[16 * r : 16 * r + 16, 16 * c : 16 * c + 16, 0]
                    match = np.flatnonzero((scaled == cell).all(axis=(1, 2)))
                    if (r, c) in filled:
                        # the cell is a sample of this split's pool, never the other's
                        assert ((match >= lo) & (match < hi)).any()
                    else:
                        assert not cell.any()


def test_ensure_demo_caches_and_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setitem(
        demo._DEFAULTS, "demo", {"num_train": 6, "num_test": 2, "image_size": 64, "seed": 0}
    )
    monkeypatch.setenv("MLGRAPH_CACHE", str(tmp_path / "cache"))
    assert demo.default_cache_dir() == tmp_path / "cache"

    def broken(root, **kw):
        (pathlib.Path(root) / "annotations").mkdir(parents=True)
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(demo, "write_demo", broken)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo("demo")
    assert list((tmp_path / "cache").iterdir()) == []  # no half folder left behind
    monkeypatch.undo()

    monkeypatch.setitem(
        demo._DEFAULTS, "demo", {"num_train": 6, "num_test": 2, "image_size": 64, "seed": 0}
    )
    path = demo.ensure_demo("demo", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "demo-v1-6x2-64px-seed0"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]
    ann = path / "annotations" / "instances_train2014.json"
    stamp = (ann.stat().st_mtime_ns, (path / "train2014").stat().st_mtime_ns)

    def must_not_run(*a, **kw):
        raise AssertionError("ensure_demo rewrote a cached data set")

    monkeypatch.setattr(demo, "write_demo", must_not_run)
    assert demo.ensure_demo("demo", cache_dir=tmp_path / "cache") == path
    assert (ann.stat().st_mtime_ns, (path / "train2014").stat().st_mtime_ns) == stamp
    assert demo.summary(path)["splits"]["train"]["images"] == 6


def test_ensure_demo_digits_folder_name_and_bad_cache(tmp_path):
    assert demo.cache_folder_name("digits-mosaic") == "digits-mosaic-v1-1200x400-seed0"
    assert demo.cache_folder_name("demo") == "demo-v1-2000x500-128px-seed0"
    bad = tmp_path / "demo-v1-2000x500-128px-seed0"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "instances_train2014.json").write_text("{}")
    with pytest.raises(DataError, match=r"incomplete \(missing annotations/instances_val2014"):
        demo.ensure_demo("demo", cache_dir=tmp_path)


def test_ensure_demo_unknown_name(tmp_path):
    with pytest.raises(ValueError) as e:
        demo.ensure_demo("coco", cache_dir=tmp_path)
    assert str(e.value) == "unknown demo data set 'coco'; valid names: demo, digits-mosaic"
    assert list(tmp_path.iterdir()) == []


def test_bad_split_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="split must be one of train, val, got 'test'"):
        demo.label_cardinality(tmp_path, "test")
    with pytest.raises(DataError, match=r"instances_val2014.json: annotation file not found"):
        demo.label_cardinality(tmp_path, "val")


@pytest.mark.slow
def test_full_default_demo(tmp_path):
    """The default demo (2000 train / 500 test, 128 px) as ensure_demo writes it."""
    root = demo.write_demo(tmp_path)
    s = demo.summary(root)
    train, val = s["splits"]["train"], s["splits"]["val"]
    assert (train["images"], val["images"]) == (2000, 500)
    assert 1.5 <= train["mean_labels"] <= 3.5 and 1.5 <= val["mean_labels"] <= 3.5
    assert min(train["per_scene"].values()) > 350 and min(val["per_scene"].values()) > 80
    assert min(train["per_class"].values()) > 100 and min(val["per_class"].values()) > 20

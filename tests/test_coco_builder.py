"""The COCO-2014 builder gives exactly the labels of the instances JSON."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from coco_fixture import CATEGORIES, write_coco

from mlgraph.data import coco, datasets
from mlgraph.errors import DataError

LABELS = {
    "train": [[1, 17], [4], [], [7, 1, 4], [17, 17]],
    "val": [[7], [1, 4, 17], []],
}


def expected_from_json(root, folder, keep_empty):
    doc = json.loads((root / "annotations" / f"instances_{folder}.json").read_text())
    order = sorted(c["id"] for c in doc["categories"])
    out = {}
    for im in doc["images"]:
        y = np.zeros(len(order), np.uint8)
        for a in doc["annotations"]:
            if a["image_id"] == im["id"]:
                y[order.index(a["category_id"])] = 1
        if y.any() or keep_empty:
            out[im["id"]] = y
    return out


@pytest.mark.parametrize("config", ["nonempty", "all"])
def test_labels_equal_json(tmp_path, config):
    raw = write_coco(tmp_path / "raw", LABELS)
    builder = datasets.build("coco2014", raw, tmp_path / "built", config)
    info = tfds.builder_from_directory(builder.data_dir).info
    # Category-id order, whatever order the JSON lists them in.
    assert info.metadata["class_names"] == ["person", "motorcycle", "train", "cat"]
    assert [c["name"] for c in sorted(CATEGORIES, key=lambda c: c["id"])] == info.metadata[
        "class_names"
    ]
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        want = expected_from_json(raw, folder, keep_empty=config == "all")
        source = builder.as_data_source(split=split)
        got = {int(source[i]["image_id"]): source[i]["labels"] for i in range(len(source))}
        assert set(got) == set(want)
        for image_id, y in want.items():
            np.testing.assert_array_equal(got[image_id], y)
        assert source[0]["image"].shape == (96, 128, 3)


def test_labels_equal_pycocotools(tmp_path):
    """An independent reader: pycocotools' category and annotation indexes."""
    coco_api = pytest.importorskip("pycocotools.coco")
    raw = write_coco(tmp_path / "raw", LABELS)
    builder = datasets.build("coco2014", raw, tmp_path / "built", "all")
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        api = coco_api.COCO(str(raw / "annotations" / f"instances_{folder}.json"))
        cat_ids = sorted(api.getCatIds())
        source = builder.as_data_source(split=split)
        assert len(source) == len(api.getImgIds())
        for i in range(len(source)):
            image_id = int(source[i]["image_id"])
            cats = {a["category_id"] for a in api.loadAnns(api.getAnnIds(imgIds=[image_id]))}
            want = np.array([c in cats for c in cat_ids], np.uint8)
            np.testing.assert_array_equal(source[i]["labels"], want)


def test_missing_files_named(tmp_path):
    raw = tmp_path / "raw"
    (raw / "annotations").mkdir(parents=True)
    (raw / "train2014").mkdir()
    with pytest.raises(DataError) as e:
        coco.check_manual_dir(raw)
    assert str(e.value) == (
        f"{raw}: not a COCO-2014 folder, missing annotations/instances_train2014.json, "
        "annotations/instances_val2014.json, val2014 (expected "
        "annotations/{train,val}2014.json, train2014/, val2014/)".replace(
            "annotations/{train,val}2014.json", "annotations/instances_{train,val}2014.json"
        )
    )


def test_unknown_category_named(tmp_path):
    raw = write_coco(tmp_path / "raw", {"train": [[1]], "val": [[4]]})
    path = raw / "annotations" / "instances_val2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(
        DataError,
        match=r"instances_val2014.json: annotation \d+ names unknown "
        r"category_id 99",
    ):
        datasets.build("coco2014", raw, tmp_path / "built")


def run_build(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run(
        [sys.executable, "-m", "mlgraph.data.build", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_cli_skips_corrupt_and_strict_stops(tmp_path):
    raw = write_coco(tmp_path / "raw", {"train": [[1], [4, 7], [17]], "val": [[7]]})
    bad = sorted((raw / "train2014").iterdir())[1]
    bad.write_bytes(b"not a jpeg")

    proc = run_build("coco2014", "--manual_dir", str(raw), "--data_dir", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "train: 2 images, 1.000 labels/image, 1 skipped" in proc.stdout
    assert f"skipped {bad}: cannot decode image" in proc.stdout
    assert "val: 1 images, 1.000 labels/image, 0 skipped" in proc.stdout

    proc = run_build(
        "coco2014", "--manual_dir", str(raw), "--data_dir", str(tmp_path / "b"), "--strict"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: cannot decode image (not a known image format) (--strict)"
    )


@pytest.mark.parametrize("name", ["coco2014", "voc2007", "voc2012", "nuswide", "custom"])
def test_making_a_builder_leaves_no_temporary_folder(name, tmp_path, monkeypatch):
    """TFDS's `initialize_from_bucket` used to leave an empty /tmp/tmp*tfds per builder."""
    import tempfile

    from mlgraph.data import datasets

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    datasets.builder_class(name)(data_dir=str(tmp_path / "data"))
    assert list(scratch.iterdir()) == []

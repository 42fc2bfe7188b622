"""Issue 32, the build's faults: a rebuild into an existing --data_dir judges the current source
files (item 3), and a custom image that cannot be read is skipped naming its list file and line
(item 12)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
from coco_fixture import write_coco
from custom_fixture import write_custom
from voc_fixture import Img, Obj, write_voc

from mlgraph.data import datasets, sources
from mlgraph.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
LINES = {
    "train": ["a.jpg\tcat", "b.jpg\tdog", "c.jpg\tdog,Cat"],  # 'Cat' is not a class
    "test": ["a.jpg\tdog", "missing.jpg\tcat"],
}
IMAGES = {"a.jpg": "rgb", "b.jpg": "rgb", "c.jpg": "rgb"}
FIXED_TRAIN = "a.jpg\tcat\nb.jpg\tdog\nc.jpg\tdog,cat\n"
TRAIN_SKIP = "train.txt:3: unknown label 'Cat' (not in classes.txt)"


def build_cli(raw, out, *flags):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "mlgraph.data.build", "custom", "--manual_dir", str(raw)]
    cmd += ["--data_dir", str(out), *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """{name: sha256} of every file of a built folder: what must survive a refused build."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_changed_source_is_refused_naming_rebuild_then_rebuilt_and_reused(tmp_path):
    raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
    out = tmp_path / "out"
    built = pathlib.Path(datasets.build("custom", raw, out).data_dir)
    before = snapshot(built)
    # The user fixes train.txt and restores the missing image.
    (raw / "train.txt").write_text(FIXED_TRAIN)
    (raw / "missing.jpg").write_bytes((raw / "a.jpg").read_bytes())
    refusal = (
        f"error: {built}: its source files changed since it was built (changed: train.txt; "
        "added: missing.jpg); build with --rebuild to replace it, or into another --data_dir"
    )
    proc = build_cli(raw, out)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (2, refusal), proc.stderr
    assert "skipped" not in proc.stdout  # the old build's skip lines are not shown
    with pytest.raises(DataError) as e:  # --strict judges the current source, not the old build
        datasets.build("custom", raw, out, strict=True)
    assert f"error: {e.value}" == refusal
    assert snapshot(built) == before  # the old build is kept as it was

    proc = build_cli(raw, out, "--rebuild")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = refusal.replace("error: ", "warning: ").split("; build with")[0] + "; rebuilding it"
    assert warning in proc.stderr.splitlines()
    assert "  train: 3 images, 1.333 labels/image, 0 skipped" in proc.stdout
    assert "  test: 2 images, 1.000 labels/image, 0 skipped" in proc.stdout
    assert not built.with_name("1.0.0.replaced").exists()

    lines = []  # unchanged now: reused, saying so (the command prints this line)
    datasets.build("custom", raw, out, strict=True, report=lines.append)
    assert lines == [f"{built}: source files unchanged since it was built from {raw}; reused"]


def test_strict_on_an_unchanged_source_stops_where_a_fresh_strict_build_would(tmp_path):
    raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
    built = pathlib.Path(datasets.build("custom", raw, tmp_path / "out").data_dir)
    before = snapshot(built)
    with pytest.raises(DataError) as fresh:
        datasets.build("custom", raw, tmp_path / "fresh", strict=True)
    with pytest.raises(DataError) as reused:
        datasets.build("custom", raw, tmp_path / "out", strict=True)
    assert str(reused.value) == str(fresh.value) == f"{raw / TRAIN_SKIP} (--strict)"
    assert snapshot(built) == before


def test_an_incomplete_build_is_never_taken_as_complete(tmp_path):
    raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
    built = pathlib.Path(datasets.build("custom", raw, tmp_path / "out").data_dir)
    shard = next(built.glob("custom-train.array_record-*"))
    data = shard.read_bytes()
    shard.write_bytes(data[:100])  # a copy cut short
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "out")
    assert str(e.value) == (
        f"{built}: an incomplete build ({shard.name} is missing or not the size it was written); "
        "build with --rebuild to replace it, or into another --data_dir"
    )
    shard.write_bytes(data)
    (built / "dataset_info.json").unlink()  # a folder that only looks like a build
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "out")
    assert str(e.value).startswith(f"{built}: an incomplete build (no dataset_info.json); ")
    (built / sources.RECORD).unlink()
    builder = datasets.build("custom", raw, tmp_path / "out", rebuild=True)
    assert len(builder.as_data_source(split="train")) == 2
    assert json.loads((built / sources.RECORD).read_text())["files"]["train.txt"].startswith(
        "sha256:"
    )


def test_a_failed_rebuild_keeps_the_old_build(tmp_path):
    raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
    built = pathlib.Path(datasets.build("custom", raw, tmp_path / "out").data_dir)
    before = snapshot(built)
    (raw / "train.txt").write_text(FIXED_TRAIN)
    (raw / "test.txt").write_text("a.jpg\tunicorn\n")
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "out", strict=True, rebuild=True)
    assert str(e.value) == (
        f"{raw / 'test.txt'}:1: unknown label 'unicorn' (not in classes.txt) (--strict)"
    )
    assert snapshot(built) == before
    assert not built.with_name("1.0.0.replaced").exists()


def test_custom_images_outside_manual_dir_are_part_of_the_source(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_custom(elsewhere, {}, {"x.jpg": "rgb", "y.jpg": "gray"})
    lines = {"train": [f"{elsewhere / 'x.jpg'}\tcat"], "test": ["../elsewhere/y.jpg\tdog"]}
    raw, _ = write_custom(tmp_path / "raw", lines, {})
    built = pathlib.Path(datasets.build("custom", raw, tmp_path / "out").data_dir)
    (elsewhere / "y.jpg").write_bytes((elsewhere / "x.jpg").read_bytes())
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "out")
    assert str(e.value).startswith(
        f"{built}: its source files changed since it was built (changed: {elsewhere / 'y.jpg'}); "
    )


def test_coco_and_voc_judge_the_files_they_read(tmp_path):
    raw = write_coco(tmp_path / "coco", {"train": [[1], [4]], "val": [[7]]})
    built = pathlib.Path(datasets.build("coco2014", raw, tmp_path / "out").data_dir)
    (raw / "notes.txt").write_text("not read by the builder")
    datasets.build("coco2014", raw, tmp_path / "out")  # reused
    path = raw / "annotations" / "instances_val2014.json"
    path.write_text(path.read_text() + "\n")
    with pytest.raises(DataError) as e:
        datasets.build("coco2014", raw, tmp_path / "out")
    assert str(e.value).startswith(
        f"{built}: its source files changed since it was built "
        "(changed: annotations/instances_val2014.json); "
    )

    images = [Img("000001", [Obj("cat")]), Img("000002", [Obj("dog")])]
    voc_raw, _ = write_voc(tmp_path / "voc", "2012", {s: images for s in ("train", "val")})
    (voc_raw / "VOCdevkit/VOC2012/ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    built = pathlib.Path(datasets.build("voc2012", voc_raw, tmp_path / "vocout").data_dir)
    # The other year unpacked into the same folder does not touch this build's source.
    write_voc(voc_raw, "2007", {"train": images})
    datasets.build("voc2012", voc_raw, tmp_path / "vocout")
    (voc_raw / "VOCdevkit/VOC2012/JPEGImages/000002.jpg").unlink()
    with pytest.raises(DataError) as e:
        datasets.build("voc2012", voc_raw, tmp_path / "vocout")
    assert str(e.value).startswith(
        f"{built}: its source files changed since it was built "
        "(removed: VOCdevkit/VOC2012/JPEGImages/000002.jpg); "
    )


def test_custom_unreadable_image_skip_names_list_file_and_line(tmp_path):
    lines = {"train": ["a.jpg\tcat", "", "bad.jpg\tdog"], "test": ["a.jpg\tdog", "gone.jpg\tcat"]}
    raw, _ = write_custom(tmp_path / "raw", lines, {"a.jpg": "rgb", "bad.jpg": "corrupt"})
    builder = datasets.build("custom", raw, tmp_path / "out")
    skipped = builder.info.metadata["skipped"]
    assert skipped["test"] == [f"{raw / 'test.txt'}:2: {raw / 'gone.jpg'}: image file not found"]
    assert skipped["train"] == [
        f"{raw / 'train.txt'}:3: {raw / 'bad.jpg'}: cannot decode image (not a known image format)"
    ]
    # The images around the bad lines are kept.
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        assert [source[i]["image_id"] for i in range(len(source))] == [b"a.jpg"]
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "strict", strict=True)
    assert str(e.value) == f"{skipped['train'][0]} (--strict)"


def test_custom_split_with_no_usable_image_is_one_error(tmp_path):
    lines = {"train": ["a.jpg\tcat"], "test": ["gone.jpg\tcat", "a.jpg\tCat"]}
    raw, _ = write_custom(tmp_path / "raw", lines, {"a.jpg": "rgb"})
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "out")
    assert str(e.value) == (
        f"{raw / 'test.txt'}: no usable image (2 lines skipped; the first: {raw / 'test.txt'}:1: "
        f"{raw / 'gone.jpg'}: image file not found)"
    )
    assert not (tmp_path / "out" / "custom" / "1.0.0").exists()


def test_a_new_image_size_limit_is_a_changed_source(tmp_path):
    raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
    out = tmp_path / "out"
    built = pathlib.Path(datasets.build("custom", raw, out).data_dir)
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, out, max_image_pixels=10**9)
    assert str(e.value) == (
        f"{built}: its source files changed since it was built (changed: option "
        "--max_image_pixels); build with --rebuild to replace it, or into another --data_dir"
    )

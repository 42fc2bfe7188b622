"""CUB-200-2011 for the single-positive protocol: the builder on a tree made here (labels,
split and Cole's preparation on exact made values), its one-line errors, Cole's and Scob's
draws against independent re-implementations of their procedures, and `configs/spml_cub.py`
training a short run on the built tree."""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import numpy as np
import pytest
from image_fixture import assert_image, write_image
from train_helpers import final_run, load_config

from mlgraph import train
from mlgraph.data import build, cub, datasets, observed
from mlgraph.errors import DataError

# Attribute names as the real attributes.txt writes them (5 instead of 312).
ATTRIBUTES = [
    "has_bill_shape::dagger",
    "has_wing_color::blue",
    "has_wing_color::brown",
    "has_size::small_(5_-_9_in)",
    "has_eye_color::black",
]
# (image id, image name, is_training_image, present attribute ids, image kind), in images.txt
# order: 10 before 9, so that images.txt's order is not the ids' order.
IMAGES = [
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, (1, 3), "rgb"),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, (2,), "gray"),
    (3, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg", 1, (1, 2, 4, 5), "rgb"),
    (4, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 0, (5,), "cmyk"),
    (5, "002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg", 1, (), "rgb"),  # no attribute
    (6, "002.Laysan_Albatross/Laysan_Albatross_0082_524.jpg", 1, (3, 4), "exif"),
    (7, "003.Sooty_Albatross/Sooty_Albatross_0001_1071.jpg", 0, (1, 2), None),  # file missing
    (8, "003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg", 1, (2, 5), "rgb"),
    (10, "004.Groove_billed_Ani/Groove_Billed_Ani_0002_1670.jpg", 1, (4,), "rgb"),
    (9, "003.Sooty_Albatross/Sooty_Albatross_0038_1065.jpg", 1, (1, 5), "png"),
    (11, "004.Groove_billed_Ani/Groove_Billed_Ani_0003_1671.jpg", 1, (2, 3), "rgb"),
    (12, "004.Groove_billed_Ani/Groove_Billed_Ani_0009_1678.jpg", 1, (3,), "rgb"),
    (13, "005.Crested_Auklet/Crested_Auklet_0001_794941.jpg", 0, (), "rgb"),  # no attribute
    (14, "005.Crested_Auklet/Crested_Auklet_0002_785261.jpg", 0, (1, 4), "rgb"),
]
TRAIN_ORDER = [1, 2, 3, 5, 6, 8, 10, 9, 11, 12]  # Cole's rows: images.txt's, train only
FIELDS = "<image_id> <attribute_id> <is_present> <certainty_id> <time>"


def multi_hot(present) -> np.ndarray:
    return np.array([int(a in present) for a in range(1, len(ATTRIBUTES) + 1)], np.uint8)


EXPECTED = {i: multi_hot(p) for i, _, _, p, _ in IMAGES}


def write_cub(root: pathlib.Path, *, with_images: bool = True) -> dict:
    """The download's files under `root` (CUB_200_2011/ and attributes.txt beside it, as the
    archive unpacks); returns {image id: expected RGB} of the images written."""
    base = root / "CUB_200_2011"
    (base / "attributes").mkdir(parents=True)
    (base / "images").mkdir()
    (root / "attributes.txt").write_text(
        "".join(f"{k} {name}\n" for k, name in enumerate(ATTRIBUTES, 1))
    )
    (base / "images.txt").write_text("".join(f"{i} {name}\n" for i, name, *_ in IMAGES))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, *_ in IMAGES))
    lines = []
    for i, _, _, present, _ in IMAGES:
        for a in range(1, len(ATTRIBUTES) + 1):
            # Certainty is not read: 1 ("not visible") on a present attribute still counts.
            certainty = (7 * i + a) % 4 + 1
            lines.append(f"{i} {a} {int(a in present)} {certainty} {3.5 * a:.3f}")
    lines[7] += " 0"  # a sixth field, read as Cole's pandas call reads it: ignored
    (base / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n\n")
    pictures = {}
    for k, (i, name, _, _, kind) in enumerate(IMAGES):
        if with_images and kind is not None:
            pictures[i] = write_image(base / "images" / name, kind, k)
    return pictures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(raw folder, data_dir, expected pictures, the summary the build command printed)."""
    tmp = tmp_path_factory.mktemp("cub")
    pictures = write_cub(tmp / "raw")
    out = tmp / "built"
    return tmp / "raw", out, pictures, build_command(tmp / "raw", out)


def build_command(raw, out, *extra):
    """`python -m mlgraph.data.build cub ...` in this process: (status, stdout lines)."""
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = build.main(["cub", "--manual_dir", str(raw), "--data_dir", str(out), *extra])
    return status, stdout.getvalue().splitlines()


def read_split(data_dir, split):
    builder = datasets.make_builder("cub", data_dir)
    source = builder.as_data_source(split=split)
    return builder, {int(source[i]["image_id"]): source[i] for i in range(len(source))}


def test_labels_split_and_images_are_coles(built):
    raw, out, pictures, (status, lines) = built
    assert status == 0
    missing = raw / "CUB_200_2011" / "images" / IMAGES[6][1]
    # 17 present attributes over the 10 training images; 3 over the 3 readable test images.
    assert lines[-4:] == [
        f"cub (5 classes) in {out}/cub2011/1.0.0",
        "  train: 10 images, 1.700 labels/image, 0 skipped, classes without positives: none",
        "  test: 3 images, 1.000 labels/image, 1 skipped, classes without positives: "
        "has_wing_color::blue, has_wing_color::brown",
        f"    skipped {missing}: image file not found",
    ]
    builder, train_split = read_split(out, "train")
    _, test_split = read_split(out, "test")
    assert builder.info.metadata["class_names"] == ATTRIBUTES
    assert builder.info.metadata["no_positive"] == {"train": 1, "test": 1}
    assert sorted(train_split) == sorted(TRAIN_ORDER)
    assert sorted(test_split) == [4, 13, 14]  # 7's file is missing
    kinds = {i: kind for i, _, _, _, kind in IMAGES}
    for examples in (train_split, test_split):
        for image_id, example in examples.items():
            np.testing.assert_array_equal(example["labels"], EXPECTED[image_id], str(image_id))
            assert_image(example["image"], pictures[image_id], kinds[image_id])
    # By hand: image 3 is has_bill_shape::dagger, has_wing_color::blue, has_size, has_eye_color.
    np.testing.assert_array_equal(train_split[3]["labels"], [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(train_split[5]["labels"], [0, 0, 0, 0, 0])
    record = json.loads((out / "cub2011" / "1.0.0" / "source_files.json").read_text())["files"]
    for name in (
        "attributes.txt",
        "CUB_200_2011/images.txt",
        "CUB_200_2011/train_test_split.txt",
        "CUB_200_2011/attributes/image_attribute_labels.txt",
    ):
        assert record[name].startswith("sha256:"), name


def test_building_again_reuses_refuses_and_rebuilds(built, tmp_path, capsys):
    raw, out, _, _ = built
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    data = tmp_path / "out"
    assert build_command(copy, data)[0] == 0
    status, lines = build_command(copy, data)
    built_dir = data / "cub2011" / "1.0.0"
    assert status == 0
    assert lines[0] == f"{built_dir}: source files unchanged since it was built from {copy}; reused"
    capsys.readouterr()
    # --strict on the reused build stops at the file that build skipped.
    assert build_command(copy, data, "--strict")[0] == 2
    missing = copy / "CUB_200_2011" / "images" / IMAGES[6][1]
    assert capsys.readouterr().err == f"error: {missing}: image file not found (--strict)\n"
    # The attribute names are part of what a build is judged by.
    names = copy / "attributes.txt"
    names.write_text(names.read_text().replace("has_eye_color::black", "has_eye_color::red"))
    assert build_command(copy, data)[0] == 2
    assert capsys.readouterr().err == (
        f"error: {built_dir}: its source files changed since it was built (changed: "
        "attributes.txt); build with --rebuild to replace it, or into another --data_dir\n"
    )
    assert build_command(copy, data, "--rebuild")[0] == 0
    builder, _ = read_split(data, "train")
    assert builder.info.metadata["class_names"][-1] == "has_eye_color::red"


@pytest.fixture
def tree(tmp_path):
    """The text files of a download (no images: the errors come first)."""
    write_cub(tmp_path, with_images=False)
    return tmp_path


def _edit(path: pathlib.Path, line: int, text: str | None) -> None:
    """Replace line `line` (1-based) of `path` by `text` (None: remove it)."""
    lines = path.read_text().split("\n")
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines))


LABELS = "CUB_200_2011/attributes/image_attribute_labels.txt"
ERRORS = [
    # (file, line, new text (None: removed), the message after "{file}" with {root} filled in)
    (LABELS, 7, "2 2 1", f":7: 3 field(s), expected 5 ({FIELDS})"),
    (LABELS, 7, "99 2 1 4 0.0", ":7: image id 99 is not in {root}/CUB_200_2011/images.txt"),
    (
        LABELS,
        7,
        "2 6 1 4 0.0",
        ":7: attribute id 6 out of range; expected 1..5 (the ids of {root}/attributes.txt)",
    ),
    (
        LABELS,
        7,
        "2 0 1 4 0.0",
        ":7: attribute id 0 out of range; expected 1..5 (the ids of {root}/attributes.txt)",
    ),
    (LABELS, 7, "2 2 yes 4 0.0", ":7: is_present 'yes', expected 0 or 1"),
    (LABELS, 7, "2x 2 1 4 0.0", ":7: image id '2x' is not an integer"),
    (
        LABELS,
        7,
        "2 1 1 4 0.0",
        ":7: image 2, attribute 1 already given on line 6 (expected one line per image and "
        "attribute)",
    ),
    (
        LABELS,
        7,
        None,
        ": image 2 has no line for attribute 2 (1 (image, attribute) pair(s) missing; expected "
        "one line per image of images.txt and attribute of attributes.txt)",
    ),
    ("CUB_200_2011/images.txt", 3, "3", ":3: 1 field(s), expected 2 (<image_id> <image_name>)"),
    ("CUB_200_2011/images.txt", 3, "1 x.jpg", ":3: image id 1 already listed on line 1"),
    (
        "CUB_200_2011/train_test_split.txt",
        2,
        "99 1",
        ":2: image id 99 is not in {root}/CUB_200_2011/images.txt",
    ),
    ("CUB_200_2011/train_test_split.txt", 2, "2 2", ":2: is_training_image '2', expected 1 or 0"),
    (
        "CUB_200_2011/train_test_split.txt",
        2,
        None,
        ": image 2 of {root}/CUB_200_2011/images.txt has no line (1 image(s) missing; expected "
        "one line per image)",
    ),
    (
        "attributes.txt",
        2,
        "3 has_wing_color::blue",
        ":2: attribute id 3, expected 2 (ids 1, 2, ... in order)",
    ),
    (
        "attributes.txt",
        2,
        "2 has_bill_shape::dagger",
        ":2: attribute name 'has_bill_shape::dagger' already on line 1",
    ),
]


def error_of(root: pathlib.Path) -> str:
    """The one line `cub.read_files(root)` stops with."""
    with pytest.raises(DataError) as e:
        cub.read_files(root)
    return str(e.value)


@pytest.mark.parametrize("rel, line, text, message", ERRORS)
def test_malformed_files_are_one_line_naming_file_and_line(tree, rel, line, text, message):
    _edit(tree / rel, line, text)
    assert error_of(tree) == f"{tree / rel}{message.format(root=tree)}"


def test_missing_files_and_the_second_place_of_the_names(tree):
    (tree / "CUB_200_2011" / "images.txt").unlink()
    assert error_of(tree) == (
        f"{tree}: not a CUB-200-2011 folder, missing CUB_200_2011/images.txt (expected "
        "CUB_200_2011/{images.txt,train_test_split.txt}, "
        "CUB_200_2011/attributes/image_attribute_labels.txt, CUB_200_2011/images/, and "
        "attributes.txt beside CUB_200_2011/: the unpacked CUB_200_2011.tgz)"
    )
    write_cub(tree / "again", with_images=False)
    root = tree / "again"
    names = (root / "attributes.txt").read_text()
    (root / "attributes.txt").unlink()
    assert error_of(root) == (
        f"{root}: missing attributes.txt (also looked for "
        "CUB_200_2011/attributes/attributes.txt): the attribute names of CUB_200_2011.tgz, "
        "<attribute_id> <attribute_name> a line"
    )
    (root / "CUB_200_2011" / "attributes" / "attributes.txt").write_text(names)
    files = cub.read_files(root)
    assert files.class_names == ATTRIBUTES
    assert files.image_ids == [i for i, *_ in IMAGES]
    np.testing.assert_array_equal(files.labels, np.stack([EXPECTED[i] for i, *_ in IMAGES]))


def test_a_malformed_file_stops_the_build_command_in_one_line(tree, capsys):
    _edit(tree / LABELS, 7, "99 2 1 4 0.0")
    assert build_command(tree, tree / "out")[0] == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {tree / LABELS}:7: image id 99 is not in {tree}/CUB_200_2011/images.txt\n"
    )
    assert not (tree / "out" / "cub2011" / "1.0.0").exists()  # nothing that looks built


def cole_reference(labels: np.ndarray) -> np.ndarray:
    """Cole's `generate_observed_labels.py` (uniform, num_pos 1, num_neg 0), as written there:
    -1/+1 labels, one RandomState(1200), per row shuffle the +1 indices and keep the first,
    then shuffle the -1 indices."""
    y = np.where(labels == 1, 1.0, -1.0)
    rng = np.random.RandomState(1200)
    out = np.zeros_like(y)
    for i in range(len(y)):
        pos = np.nonzero(y[i] == 1.0)[0]
        rng.shuffle(pos)
        out[i, pos[:1]] = 1.0
        neg = np.nonzero(y[i] == -1.0)[0]
        rng.shuffle(neg)
    return out


def _body(path):
    return [line.split("\t") for line in path.read_text().splitlines() if not line.startswith("#")]


def test_cole_and_scob_draws(built):
    raw, out, _, _ = built
    data = out / "cub2011" / "1.0.0"
    source = observed.read_source_order("cub", raw, "train")
    assert source.image_ids == tuple(TRAIN_ORDER)
    y = observed.observed_labels(data, "train", "cole", source_order=source)
    path = observed.observed_path(data, "train", "cole")
    first = path.read_bytes()
    # Cole's rows: every training image in images.txt order, image 5 (no attribute) with none.
    matrix = np.stack([EXPECTED[i] for i in TRAIN_ORDER])
    want = cole_reference(matrix)
    assert _body(path) == [
        [str(i), ATTRIBUTES[int(np.argmax(w))] if w.any() else ""]
        for i, w in zip(TRAIN_ORDER, want, strict=True)
    ]
    assert ["5", ""] in _body(path)
    assert "# an empty class: the image has no positive; Cole's draw keeps none for it" in (
        path.read_text().splitlines()
    )
    examples = datasets.make_builder("cub", out).as_data_source(split="train")
    source_ids = [int(examples[p]["image_id"]) for p in range(len(examples))]
    for p, image_id in enumerate(source_ids):
        assert y[p].sum() == EXPECTED[image_id].any()
        assert (y[p] <= EXPECTED[image_id]).all()  # the kept one is a true positive
    # Written once, the same bytes when written again.
    path.unlink()
    observed.observed_labels(data, "train", "cole", source_order=source)
    assert path.read_bytes() == first

    # Cole's cut runs over all 10 rows (image 5 included), as Cole's generate_split.
    cut = observed.cole_split(data, "train", source_order=source)
    perm = np.random.RandomState(1200).permutation(10)
    by_row = np.asarray([source_ids.index(i) for i in TRAIN_ORDER])
    np.testing.assert_array_equal(cut.train, by_row[np.sort(perm[:8])])
    np.testing.assert_array_equal(cut.val, by_row[np.sort(perm[-2:])])

    # Scob's draw (mlgraph's rule for CUB): images with a positive, Cole's order, ascending lists.
    observed.observed_labels(data, "train", "scob", source_order=source)
    rng = random.Random(114514)
    with_positive = [i for i in TRAIN_ORDER if EXPECTED[i].any()]
    want_scob = [
        [str(i), rng.choice([ATTRIBUTES[c] for c in np.flatnonzero(EXPECTED[i])])]
        for i in with_positive
    ]
    assert _body(observed.observed_path(data, "train", "scob")) == want_scob

    # Without the raw order the rows fall back to ascending ids, and the header says so.
    fallback = observed.draw(observed.read_built_split(data, "train"), "cole")
    assert [source_ids[p] for p in fallback.rows] == sorted(TRAIN_ORDER)
    assert (
        "# order source: built data set, fallback: ascending image id (the official images.txt "
        "lists ids in ascending order)" in fallback.header
    )


def test_the_config_builds_from_the_made_tree_and_trains(built, tmp_path):
    _, out, _, _ = built
    config = load_config("spml_cub", "loss=em,runlocal=True")
    assert (config.batch_size, config.optimizer.lr, config.loss.alpha) == (8, 1e-4, 0.01)
    assert (config.loss.beta, config.loss.warmup_epochs, config.loss.expected_num_pos) == (
        0.4,
        3,
        31.4,
    )
    config.data.data_dir = str(out)
    config.image_size = 32
    config.model.backbone_kwargs = {"widths": (8, 16)}
    # The training rows: Cole's 8 of 10 (image 5, without a positive, is a row).
    dataset = datasets.open_dataset(config.data)
    split = datasets.training_split(dataset, config.data)
    assert (split.num_examples, len(split.holdout)) == (8, 2)
    config.data.val_fraction = 0.0
    whole = datasets.training_split(dataset, config.data)
    assert whole.num_examples == 10 and int(whole.observed.sum()) == 9
    config.data.val_fraction = 0.2
    train.run(config, tmp_path / "w")
    _, lines = final_run(tmp_path / "w")
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 2 and np.isfinite(losses).all()  # logged at steps 2 and 4
    last = lines[-1]
    assert last["step"] == 4 and 0.0 < last["val/spml_mAP"] <= 100.0
    assert 0.0 < last["eval/spml_mAP"] <= 100.0

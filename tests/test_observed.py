"""Single-positive observed labels (mlgraph.data.observed) against Cole's and Scob's procedures,
each written again here from docs/scob_spml.md §1.2-§1.4 and §3.9, independently of the module."""

import json
import pathlib
import random
import shutil

import numpy as np
import pytest
from coco_fixture import write_coco
from custom_fixture import write_custom
from voc_fixture import Img, Obj, write_voc

from mlgraph.data import datasets, observed
from mlgraph.errors import ConfigError, DataError

# ------------------------------------------------- the procedures, from docs/scob_spml.md


def cole_reference(labels, seed=1200, negative_shuffle=True):
    """docs/scob_spml.md §1.3: 0 -> -1, fresh RandomState(seed), per row shuffle the +1 indices
    in place and keep the first, then shuffle the -1 indices too (the hidden draw)."""
    y = np.where(np.asarray(labels) == 0, -1, 1)
    rng = np.random.RandomState(seed)
    out = np.zeros(y.shape, np.uint8)
    for i in range(y.shape[0]):
        idx_pos = np.nonzero(y[i] == 1)[0]
        rng.shuffle(idx_pos)
        out[i, idx_pos[:1]] = 1
        idx_neg = np.nonzero(y[i] == -1)[0]
        if negative_shuffle:
            rng.shuffle(idx_neg)
    return out


def scob_reference(label_lists, seed=114514):
    """docs/scob_spml.md §3.9: random.seed(114514), then random.choice(labels) per image in list
    order."""
    random.seed(seed)
    return [random.choice(labels) for labels in label_lists]


# Several positives per row, and rows whose negatives are shuffled between two rows with
# several positives, so that leaving out the hidden draw changes later picks.
HAND = np.array(
    [
        [1, 1, 0, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 0, 1],
        [1, 1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
        [0, 1, 0, 1, 0, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ],
    np.uint8,
)


def test_cole_sample_equals_the_procedure():
    got = observed.cole_sample(HAND)
    np.testing.assert_array_equal(got, cole_reference(HAND))
    assert (got.sum(axis=1) == 1).all() and (got <= HAND).all()


def test_cole_sample_needs_the_negative_shuffle():
    # The test can fail: without the hidden draw the picks on this matrix are different.
    assert not np.array_equal(
        observed.cole_sample(HAND), cole_reference(HAND, negative_shuffle=False)
    )


def test_cole_sample_row_without_positive_is_an_error():
    y = HAND.copy()
    y[3] = 0
    with pytest.raises(DataError, match=r"row 3 \(image img-d\) has no positive"):
        observed.cole_sample(y, image_ids=["img-a", "img-b", "img-c", "img-d"] + ["x"] * 4)


LISTS = [[3, 7, 1], [2], [9, 1], [4, 5, 6, 0], [8, 2], [1, 3, 5, 7, 9], [6, 0], [5, 4]]


def test_scob_sample_equals_the_procedure():
    assert observed.scob_sample(LISTS) == scob_reference(LISTS)
    # The order inside a list matters (the test can fail on it).
    reordered = [sorted(x) for x in LISTS]
    assert observed.scob_sample(reordered) != scob_reference(LISTS)
    with pytest.raises(DataError, match=r"row 1 \(image b\) has no positive"):
        observed.scob_sample([[1], []], image_ids=["a", "b"])


@pytest.mark.parametrize("n", [7, 10, 5717, 82081])
def test_val_cut_equals_randomstate_permutation(n):
    perm = np.random.RandomState(1200).permutation(n)
    n_val = int(np.round(0.2 * n))
    train, val = observed.cole_val_cut(n)
    np.testing.assert_array_equal(val, np.sort(perm[n - n_val :]))
    np.testing.assert_array_equal(train, np.sort(perm[: n - n_val]))
    assert len(val) == round(n / 5) and sorted(np.concatenate([train, val])) == list(range(n))


def test_val_cut_of_too_few_rows_is_an_error():
    with pytest.raises(DataError, match="too few"):
        observed.cole_val_cut(2)


# ------------------------------------------------------------------------- a tiny COCO

# Listed out of id order (Cole's class order is the listed order), with 12 classes so that
# Scob's alphabetical indices collide in a small set's table (0/8, 1/9, 2/10, 3/11).
CATEGORIES = [
    (5, "zebra"),
    (1, "person"),
    (3, "car"),
    (12, "apple"),
    (7, "kite"),
    (2, "bicycle"),
    (9, "dog"),
    (4, "motorcycle"),
    (11, "bowl"),
    (6, "bus"),
    (8, "boat"),
    (10, "tie"),
]
NAME = dict(CATEGORIES)
# Image ids whose string order (10, 100, 1000, 11, 2, 5, 9) is not their numeric order, listed
# in neither; 99 has no annotation.
COCO_IMAGES = [100, 9, 1000, 10, 2, 11, 99, 5]
# (image id, category id) in JSON order: images interleaved, repeats included.
COCO_ANNS = [
    (100, 1), (9, 2), (1000, 5), (100, 2), (9, 1), (1000, 11), (10, 4), (2, 10), (11, 9),
    (1000, 12), (2, 8), (11, 7), (10, 12), (9, 1), (1000, 4), (2, 3), (11, 6), (11, 3),
    (11, 1), (5, 3), (11, 5), (100, 11), (11, 11), (11, 2), (10, 8),
]  # fmt: skip


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory):
    """A COCO-2014 folder whose train JSON is the one above (val: two plain images)."""
    raw = tmp_path_factory.mktemp("coco") / "raw"
    write_coco(raw, {"train": [[1]] * len(COCO_IMAGES), "val": [[1], [4]]})
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in CATEGORIES]
    for folder in ("train2014", "val2014"):
        path = raw / "annotations" / f"instances_{folder}.json"
        doc = json.loads(path.read_text())
        doc["categories"] = categories
        if folder == "train2014":
            for im, image_id in zip(doc["images"], COCO_IMAGES, strict=True):
                im["id"] = image_id  # the file keeps its name: the builder reads file_name
            doc["annotations"] = [
                {"id": k + 1, "image_id": i, "category_id": c, "bbox": [1, 1, 5, 5], "area": 25}
                for k, (i, c) in enumerate(COCO_ANNS)
            ]
        path.write_text(json.dumps(doc))
    return raw


@pytest.fixture(scope="module")
def coco_built(coco_raw, tmp_path_factory):
    """Built with config 'all', so image 99 (no annotation) is in the split; the observed files
    of both schemes are written from the raw files' order at once, so that every test (in any
    order) reads the same files."""
    out = tmp_path_factory.mktemp("coco_built")
    built = datasets.build("coco2014", coco_raw, out, "all").data_dir
    source = observed.read_source_order("coco2014", coco_raw, "train")
    for scheme in observed.SCHEMES:
        observed.observed_file(built, "train", scheme, source_order=source)
    return built


def data_lines(path):
    return [
        tuple(line.split("\t"))
        for line in path.read_text().splitlines()
        if not line.startswith("#")
    ]


def cole_coco_expected():
    """Cole's format_coco.py + generate_observed_labels.py on COCO_ANNS, from docs/scob_spml.md
    §1.2-§1.3."""
    ids = [int(s) for s in sorted({str(i) for i, _ in COCO_ANNS})]
    column = {c: k for k, (c, _) in enumerate(CATEGORIES)}
    y = np.zeros((len(ids), len(CATEGORIES)), np.uint8)
    for i, c in COCO_ANNS:
        y[ids.index(i), column[c]] = 1
    obs = cole_reference(y)
    return [(str(i), CATEGORIES[int(np.argmax(r))][1]) for i, r in zip(ids, obs, strict=True)]


def scob_coco_expected():
    """Scob's data/coco.py: alphabetical class indices, list(set(...)) per image filled in
    annotation order, images in the JSON's order, then seed 114514 and random.choice."""
    names = sorted(NAME.values())
    index = {n: k for k, n in enumerate(names)}
    sets = {}
    for i, c in COCO_ANNS:
        if i not in sets:
            sets[i] = set()
        sets[i].add(index[NAME[c]])
    img_list = [(i, list(sets[i])) for i in COCO_IMAGES if i in sets]
    picks = scob_reference([labels for _, labels in img_list])
    return [(str(i), names[k]) for (i, _), k in zip(img_list, picks, strict=True)]


def test_coco_cole_rows_classes_and_draws(coco_built, coco_raw):
    source = observed.read_source_order("coco2014", coco_raw, "train")
    y = observed.observed_labels(coco_built, "train", "cole", source_order=source)
    path = observed.observed_path(coco_built, "train", "cole")
    lines = data_lines(path)
    # Rows in string order of the ids; the image without annotation has no row.
    assert [int(i) for i, _ in lines] == [10, 100, 1000, 11, 2, 5, 9]
    assert lines == cole_coco_expected()
    # The built class order (category-id order) differs from the JSON's: the columns were
    # permuted so the draw is Cole's, and the header says so.
    assert "# classes: permuted to the source's category order" in path.read_text()
    built = observed.read_built_split(coco_built, "train")
    assert built.class_names == [NAME[c] for c in sorted(NAME)]
    want = dict(lines)
    for p, image_id in enumerate(built.image_ids):
        row = np.zeros(len(NAME), np.uint8)
        if str(image_id) in want:
            row[built.class_names.index(want[str(image_id)])] = 1
        np.testing.assert_array_equal(y[p], row, err_msg=str(image_id))


def test_coco_scob_set_order_and_json_order(coco_built, coco_raw):
    source = observed.read_source_order("coco2014", coco_raw, "train")
    observed.observed_labels(coco_built, "train", "scob", source_order=source)
    path = observed.observed_path(coco_built, "train", "scob")
    assert data_lines(path) == scob_coco_expected()
    # The data exercise CPython's set order: filled in annotation order, image 1000's set
    # (Scob indices 11, 3, 0, 8) lists differently from one filled in ascending order.
    in_annotation_order, ascending = set(), set()
    for k in (11, 3, 0, 8):
        in_annotation_order.add(k)
    for k in (0, 3, 8, 11):
        ascending.add(k)
    assert list(in_annotation_order) != list(ascending)
    # Asking again with another order is refused instead of silently reusing the file.
    other = observed.SourceOrder(
        image_ids=tuple(reversed(source.image_ids)),
        class_names=source.class_names,
        annotations=source.annotations,
    )
    with pytest.raises(DataError, match="delete the file"):
        observed.observed_file(coco_built, "train", "scob", source_order=other)


def test_coco_scob_fallback_without_raw_files(coco_raw, tmp_path):
    built = datasets.build("coco2014", coco_raw, tmp_path, "all").data_dir
    observed.observed_labels(built, "train", "scob")
    text = observed.observed_path(built, "train", "scob").read_text()
    assert "# order source: built data set, fallback: ascending image id" in text
    assert [int(i) for i, _ in data_lines(observed.observed_path(built, "train", "scob"))] == [
        2,
        5,
        9,
        10,
        11,
        100,
        1000,
    ]


def test_file_bytes_are_identical_on_rebuild(coco_built, coco_raw, tmp_path):
    source = observed.read_source_order("coco2014", coco_raw, "train")
    path = observed.observed_file(coco_built, "train", "cole", source_order=source)
    first = path.read_bytes()
    assert first.startswith(b"# mlgraph single-positive observed labels, format 1\n# scheme: cole")
    # Written again from scratch, and from a second build of the same raw files.
    copy = tmp_path / "copy"
    shutil.copytree(coco_built, copy)
    (copy / path.name).unlink()
    again = observed.observed_file(copy, "train", "cole", source_order=source)
    assert again.read_bytes() == first
    rebuilt = datasets.build("coco2014", coco_raw, tmp_path / "rebuilt", "all").data_dir
    other = observed.observed_file(rebuilt, "train", "cole", source_order=source)
    assert other.read_bytes() == first
    # Reused when present: the file is not rewritten.
    mtime = path.stat().st_mtime_ns
    observed.observed_labels(coco_built, "train", "cole")
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".observed")]


def test_file_reads_back_to_the_same_matrix(coco_built):
    built = observed.read_built_split(coco_built, "train")
    path = observed.observed_file(coco_built, "train", "cole")
    matrix, rows = observed.read_observed(path, built, "cole")
    by_hand = np.zeros_like(matrix)
    position = {str(i): p for p, i in enumerate(built.image_ids)}
    for image_id, name in data_lines(path):
        by_hand[position[image_id], built.class_names.index(name)] = 1
    np.testing.assert_array_equal(matrix, by_hand)
    np.testing.assert_array_equal(observed.observed_labels(coco_built, "train"), matrix)
    # An opened data set (datasets.Dataset) names the same folder.
    opened = datasets.Dataset("coco2014", pathlib.Path(coco_built), built.class_names, {})
    np.testing.assert_array_equal(observed.observed_labels(opened, "train"), matrix)
    assert [str(built.image_ids[p]) for p in rows] == [i for i, _ in data_lines(path)]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ls: ls[:10] + ["1000 apple"] + ls[11:], r":11: expected 'image_id<TAB>class_name'"),
        (lambda ls: ls[:10] + ["77\tapple"] + ls[11:], r":11: image id '77' is not in split"),
        (lambda ls: ls + [ls[10]], r":16: image id '1000' already listed on line 11"),
        (lambda ls: ls[:10] + ["1000\tunicorn"] + ls[11:], r":11: unknown class 'unicorn'"),
        (lambda ls: ls[:10] + ["1000\tperson"] + ls[11:], r":11: class 'person' is not a pos"),
        (lambda ls: ls[:10] + ls[11:], r": image '1000' has no line"),
        (lambda ls: ["# something else"] + ls[1:], r":1: expected the first line"),
    ],
)
def test_corrupted_file_is_a_one_line_error(coco_built, tmp_path, change, message):
    built = observed.read_built_split(coco_built, "train")
    good = observed.observed_file(coco_built, "train", "cole").read_text().splitlines()
    # 8 header lines, then Cole's rows 10, 100, 1000, ...: line 11 is image 1000's.
    assert len(good) == 15 and good[10].startswith("1000\t")
    bad = tmp_path / "observed_train_cole.tsv"
    bad.write_text("\n".join(change(good)) + "\n")
    with pytest.raises(DataError, match=message) as e:
        observed.read_observed(bad, built)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_cole_split_equals_the_permutation(coco_built):
    built = observed.read_built_split(coco_built, "train")
    cut = observed.cole_split(coco_built, "train")
    rows = [10, 100, 1000, 11, 2, 5, 9]  # Cole's rows: ids with annotations, string order
    perm = np.random.RandomState(1200).permutation(len(rows))
    n_val = int(np.round(0.2 * len(rows)))
    assert [built.image_ids[p] for p in cut.val] == [rows[i] for i in sorted(perm[-n_val:])]
    assert [built.image_ids[p] for p in cut.train] == [
        rows[i] for i in sorted(perm[: len(rows) - n_val])
    ]
    y = observed.observed_labels(coco_built, "train")
    np.testing.assert_array_equal(cut.observed_train, y[cut.train])
    np.testing.assert_array_equal(cut.observed_val, y[cut.val])


def test_unknown_scheme_and_split(coco_built):
    with pytest.raises(ConfigError, match="scheme 'random'"):
        observed.observed_labels(coco_built, "train", "random")
    with pytest.raises(ConfigError, match="split 'test' not in"):
        observed.observed_labels(coco_built, "test")


# -------------------------------------------------------------------------- a tiny VOC

VOC_TRAIN = [  # ImageSets/Main/train.txt order, not sorted
    Img("2008_000123", [Obj("dog"), Obj("person", 1)]),
    Img("2008_000008", [Obj("cat"), Obj("chair"), Obj("bottle")]),
    Img("2007_000999", [Obj("aeroplane", 1)]),  # only difficult: no row
    Img("2008_000008-b", [Obj("person"), Obj("bicycle"), Obj("car"), Obj("horse")]),
    Img("2008_000050", [Obj("sofa"), Obj("tvmonitor"), Obj("person"), Obj("bird", 1)]),
    Img("2008_000001", [Obj("bird"), Obj("aeroplane")]),
    Img("2008_000777", [Obj("person"), Obj("dog"), Obj("cat"), Obj("sofa")]),
]
VOC_VAL = [Img("2008_000200", [Obj("cow")])]
VOC_NAMES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


def voc_positives():
    return {
        im.image_id: [VOC_NAMES.index(o.name) for o in im.objects if o.difficult == 0]
        for im in VOC_TRAIN
    }


@pytest.fixture(scope="module")
def voc_built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("voc")
    raw, _ = write_voc(
        tmp / "raw",
        "2012",
        {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": VOC_TRAIN + VOC_VAL},
    )
    return raw, datasets.build("voc2012", raw, tmp / "built").data_dir


def test_voc_cole_rows_are_sorted_file_names(voc_built):
    _, built_dir = voc_built
    observed.observed_labels(built_dir, "train", "cole")
    lines = data_lines(observed.observed_path(built_dir, "train", "cole"))
    positives = voc_positives()
    ids = sorted((i for i, c in positives.items() if c), key=lambda i: i + ".jpg")
    # '-' sorts before '.', so the file-name order is not the id order.
    assert ids[1:3] == ["2008_000008-b", "2008_000008"] and ids != sorted(ids)
    assert "2007_000999" not in ids
    y = np.zeros((len(ids), 20), np.uint8)
    for r, i in enumerate(ids):
        y[r, positives[i]] = 1  # difficult-only classes are not positives
    obs = cole_reference(y)
    assert lines == [(i, VOC_NAMES[int(np.argmax(o))]) for i, o in zip(ids, obs, strict=True)]


@pytest.mark.parametrize("with_source", [True, False])
def test_voc_scob_union_order(voc_built, tmp_path, with_source):
    raw, built_dir = voc_built
    copy = tmp_path / "built"
    shutil.copytree(built_dir, copy)
    source = observed.read_source_order("voc2012", raw, "train") if with_source else None
    observed.observed_labels(copy, "train", "scob", source_order=source)
    listed = [im.image_id for im in VOC_TRAIN]
    order = listed if with_source else sorted(listed)
    positives = voc_positives()
    img_ids, labels = [], {}
    for c in range(20):  # Scob: scan the per-class lists, first appearance wins
        for i in order:
            if c in positives[i]:
                if i not in labels:
                    labels[i] = []
                    img_ids.append(i)
                labels[i].append(c)
    picks = scob_reference([labels[i] for i in img_ids])
    lines = data_lines(observed.observed_path(copy, "train", "scob"))
    assert lines == [(i, VOC_NAMES[k]) for i, k in zip(img_ids, picks, strict=True)]


# ---------------------------------------------------------------------- a custom data set


def test_custom_rows_and_images_without_label(tmp_path):
    images = {p: "rgb" for p in ("img/b.jpg", "img/a10.jpg", "img/a9.jpg", "img/c.jpg")}
    lines = {
        "train": ["img/b.jpg\tdog,cat", "img/a10.jpg\tcat", "img/c.jpg\t"],
        "test": ["img/b.jpg\tdog,cat,traffic light", "img/a9.jpg\tdog", "img/a10.jpg\tcat"],
    }
    raw, _ = write_custom(tmp_path / "raw", lines, images)
    built = datasets.build("custom", raw, tmp_path / "built").data_dir
    with pytest.raises(DataError, match="image img/c.jpg of split 'train' has no label"):
        observed.observed_labels(built, "train")
    observed.observed_labels(built, "test")
    got = data_lines(observed.observed_path(built, "test", "cole"))
    assert [i for i, _ in got] == ["img/a10.jpg", "img/a9.jpg", "img/b.jpg"]
    # Builder class order: dog, traffic light, cat.
    y = np.array([[0, 0, 1], [1, 0, 0], [1, 1, 1]], np.uint8)
    want = [["dog", "traffic light", "cat"][int(np.argmax(r))] for r in cole_reference(y)]
    assert [c for _, c in got] == want


def test_nuswide_rows_follow_the_given_list():
    built = observed.BuiltSplit(
        directory=None,
        name="nus_wide",
        split="train",
        class_names=["a", "b", "c"],
        image_ids=["x/2.jpg", "x/10.jpg", "y/1.jpg"],
        positives=np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], bool),
        skipped=0,
    )
    source = observed.SourceOrder(image_ids=("y/1.jpg", "z/0.jpg", "x/2.jpg", "x/10.jpg"))
    assert observed.cole_rows(built, source) == [2, 0, 1]
    assert observed.cole_rows(built) == [1, 0, 2]  # fallback: ids sorted as strings
    result = observed.draw(built, "cole")
    assert any("fallback: image ids sorted as strings" in h for h in result.header)
    with pytest.raises(DataError, match="image x/10.jpg of split 'train' is not in the given"):
        observed.cole_rows(built, observed.SourceOrder(image_ids=("y/1.jpg", "x/2.jpg")))


def test_training_split_without_a_cut_leaves_out_images_without_a_positive(voc_built):
    from mlgraph import config_lib

    _, built_dir = voc_built
    data = config_lib.base_config().data
    data.name, data.eval_split = "voc2012", "val"
    data.data_dir = str(pathlib.Path(built_dir).parents[1])
    data.observed = "scob"
    dataset = datasets.open_dataset(data)
    split = datasets.training_split(dataset, data)
    kept = {split.source[i]["image_id"].decode() for i in range(split.num_examples)}
    with_positive = {i for i, c in voc_positives().items() if c}
    assert "2007_000999" not in kept and kept == with_positive
    np.testing.assert_array_equal(split.observed.sum(axis=1), 1.0)

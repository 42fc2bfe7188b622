"""NUS-WIDE config 'ov' (SigRL/BiAM open vocabulary): seen tags ++ unseen concepts, labels and
`ignored` exactly as the raw tag files or BiAM's h5 files say, and the pipeline's label mask."""

import pickle

import ml_collections
import numpy as np
import pytest
from image_fixture import assert_image
from nuswide_fixture import CONCEPTS, Entry, write_nuswide, write_tags

from mlgraph import config_lib
from mlgraph.data import augment, datasets, nuswide, pipeline, registry
from mlgraph.errors import DataError

# Not alphabetical on purpose; sky, water, zebra and person are also concepts.
TAGS = ["sunset", "sky", "dog", "beach", "water", "cat", "car", "zebra", "tree", "night"]
TAGS += ["person", "flower"]
# By hand: TagList1k order less the concepts, then Concepts81 order.
SEEN = ["sunset", "dog", "beach", "cat", "car", "tree", "night", "flower"]
CLASS_NAMES = SEEN + CONCEPTS  # + sky, animal, water, person, zebra

# (Imagelist line, Groundtruth concepts, official split, image kind), Flickr tags.
OV = [
    (Entry(r"actor\0001_11.jpg", ("sky", "person"), "train"), ("sunset", "sky")),
    (Entry(r"actor\0002_12.jpg", (), "train"), ()),  # no positive at all: kept
    (
        Entry(r"C:\ImageData\Flickr\beach\0003_13.jpg", ("water", "animal"), "test", "gray"),
        ("beach", "dog", "water"),
    ),
    # The tag 'water' is not the concept: unseen columns come from Groundtruth.
    (Entry(r"beach\0004_14.jpg", ("zebra",), "train", "cmyk"), ("car", "water")),
    (Entry(r"beach\0005_15.jpg", ("sky",), "train", None), ("night",)),  # file missing
    (Entry(r"cat\0006_16.jpg", ("animal",), "test"), ("cat",)),
    (Entry(r"cat\0007_17.jpg", (), "test"), ("flower", "tree")),  # seen positives only
    (Entry(r"cat\0008_18.jpg", ("person",), ""), ("car",)),  # in neither official list
    (Entry(r"dog\0009_19.jpg", (), "test"), ()),  # no positive at all: kept
    (Entry(r"big_cat\0010_20.jpg", ("animal",), "train"), ("cat", "dog")),
]
ENTRIES = [e for e, _ in OV]
ENTRY_TAGS = [t for _, t in OV]
KINDS = {e.line.split("Flickr\\")[-1].replace("\\", "/"): e.kind for e in ENTRIES}
MISSING = "beach/0005_15.jpg"


def write_ov_raw(root, entries=ENTRIES, entry_tags=ENTRY_TAGS, **kwargs):
    """The raw NUS-WIDE tree of config 'ov'; returns (root, expected RGB per entry)."""
    root, pictures = write_nuswide(root, entries)
    write_tags(root, TAGS, entry_tags, **kwargs)
    return root, pictures


def expected_from_raw(root):
    """(class names, num_seen, {split: {entry: labels}}) read independently from the raw files."""

    def entries(name):
        return [
            line.strip().replace("\\", "/").split("Flickr/")[-1]
            for line in (root / "ImageList" / name).read_text().splitlines()
        ]

    tags = (root / "NUS_WID_Tags" / "TagList1k.txt").read_text().split()
    concepts = (root / "Concepts81.txt").read_text().split()
    seen = [i for i, t in enumerate(tags) if t not in concepts]
    all_tags = np.loadtxt(root / "NUS_WID_Tags" / "AllTags1k.txt", dtype=np.uint8, ndmin=2)
    groundtruth = np.stack(
        [
            np.loadtxt(root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt", dtype=np.uint8)
            for c in concepts
        ],
        axis=1,
    )
    matrix = np.concatenate([all_tags[:, seen], groundtruth], axis=1)
    all_entries = entries("Imagelist.txt")
    out = {}
    for split, name in (("train", "TrainImagelist.txt"), ("test", "TestImagelist.txt")):
        members = set(entries(name))
        out[split] = {e: matrix[i] for i, e in enumerate(all_entries) if e in members}
    return [tags[i] for i in seen] + concepts, len(seen), out


def read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {source[i]["image_id"].decode(): source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def built_raw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nuswide_ov")
    raw, pictures = write_ov_raw(tmp / "raw")
    # BiAM's h5 files next to the raw tag files are not read (these are no HDF5 at all).
    (raw / "features").mkdir()
    for name in ("nus_wide_train.h5", "nus_wide_test.h5"):
        (raw / "features" / name).write_bytes(b"not read")
    return raw, pictures, datasets.build("nuswide", raw, tmp / "built", config="ov")


def test_raw_classes_and_labels(built_raw):
    raw, pictures, builder = built_raw
    meta = builder.info.metadata
    assert meta["class_names"] == CLASS_NAMES
    assert meta["num_seen"] == len(SEEN) == 8
    assert meta["label_source"] == "tags"
    names, num_seen, expected = expected_from_raw(raw)
    assert (names, num_seen) == (CLASS_NAMES, 8)
    train, test = read_split(builder, "train"), read_split(builder, "test")
    # Images without positives (actor/0002_12, dog/0009_19) are kept.
    assert sorted(train) == [
        "actor/0001_11.jpg",
        "actor/0002_12.jpg",
        "beach/0004_14.jpg",
        "big_cat/0010_20.jpg",
    ]
    assert sorted(test) == [
        "beach/0003_13.jpg",
        "cat/0006_16.jpg",
        "cat/0007_17.jpg",
        "dog/0009_19.jpg",
    ]
    for split, got in (("train", train), ("test", test)):
        assert set(got) == set(expected[split]) - {MISSING}
        for entry, example in got.items():
            assert example["labels"].dtype == np.uint8
            np.testing.assert_array_equal(example["labels"], expected[split][entry], err_msg=entry)
            np.testing.assert_array_equal(example["ignored"], np.zeros(13, np.uint8))
            assert_image(example["image"], pictures[entry], KINDS[entry])
    # By hand: sunset dog beach cat car tree night flower | sky animal water person zebra.
    by_hand = {
        "actor/0001_11.jpg": [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0],
        "actor/0002_12.jpg": [0] * 13,
        "beach/0004_14.jpg": [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
        "big_cat/0010_20.jpg": [0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        "beach/0003_13.jpg": [0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        "cat/0006_16.jpg": [0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        "cat/0007_17.jpg": [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0],
        "dog/0009_19.jpg": [0] * 13,
    }
    for entry, want in by_hand.items():
        got = (train | test)[entry]["labels"]
        np.testing.assert_array_equal(got, want, err_msg=entry)


def test_raw_counts(built_raw):
    raw, _, builder = built_raw
    meta = builder.info.metadata
    assert meta["skipped"] == {
        "train": [f"{raw / 'Flickr' / 'beach' / '0005_15.jpg'}: image file not found"],
        "test": [],
    }
    assert meta["unlisted"] == 1
    # Listed images without a positive seen tag: actor/0002_12 and dog/0009_19.
    assert meta["no_seen_positive"] == {"train": 1, "test": 1}
    assert "dropped_no_labels" not in meta
    assert builder.info.splits["train"].num_examples == 4
    assert builder.info.splits["test"].num_examples == 4


def test_default_config_unchanged(tmp_path):
    """'' is still the 81-concept set, without `ignored`; 'nuswide_ov' names the 'ov' config."""
    raw, _ = write_ov_raw(tmp_path / "raw", ENTRIES[:4], ENTRY_TAGS[:4])
    builder = datasets.build("nuswide", raw, tmp_path / "built")
    assert builder.builder_config.name == "concepts81"
    assert builder.info.metadata["class_names"] == CONCEPTS
    assert "ignored" not in builder.info.features
    assert sorted(read_split(builder, "train")) == ["actor/0001_11.jpg", "beach/0004_14.jpg"]
    row = registry.get("nuswide_ov")
    assert (row.builder_class(), row.builder_config, row.train_split, row.eval_split) == (
        nuswide.NusWide,
        "ov",
        "train",
        "test",
    )
    assert row.num_classes == 1006


def test_tag_list_at_root_and_strict(tmp_path):
    raw, _ = write_ov_raw(tmp_path / "raw", ENTRIES[:5], ENTRY_TAGS[:5], tag_list_at_root=True)
    builder = datasets.build("nuswide", raw, tmp_path / "a", config="ov")
    assert builder.info.metadata["class_names"] == CLASS_NAMES
    with pytest.raises(DataError) as e:
        datasets.build("nuswide", raw, tmp_path / "b", config="ov", strict=True)
    assert (
        str(e.value)
        == f"{raw / 'Flickr' / 'beach' / '0005_15.jpg'}: image file not found (--strict)"
    )


# BiAM's h5 label files: +1 / -1 / 0 per class. Train: 8 seen values; test: 13 values, and the
# last 5 again as labels_81. 'dog_0009_19' has no '.jpg' (added); 'beach_0005_15.jpg' is missing.
H5_TRAIN = {
    "actor_0001_11.jpg": [1, -1, -1, -1, -1, -1, -1, 0],
    "actor_0002_12.jpg": [-1] * 8,
    "beach_0004_14.jpg": [-1, -1, -1, -1, 1, 0, 0, -1],
    "beach_0005_15.jpg": [-1, -1, -1, -1, -1, -1, 1, -1],
    "big_cat_0010_20.jpg": [-1, 1, -1, 1, -1, -1, -1, -1],
}
H5_TEST = {
    "beach_0003_13.jpg": [-1, 1, 1, -1, -1, -1, -1, -1] + [-1, 1, 1, -1, -1],
    "cat_0006_16.jpg": [-1, -1, -1, 1, -1, 0, -1, -1] + [0, 1, -1, -1, 0],
    "cat_0007_17.jpg": [-1, -1, -1, -1, -1, 1, -1, 1] + [-1, -1, -1, -1, -1],
    "dog_0009_19": [0, -1, -1, -1, -1, -1, -1, -1] + [-1, -1, 0, -1, -1],
}
H5_ENTRY = {
    "actor_0001_11.jpg": "actor/0001_11.jpg",
    "actor_0002_12.jpg": "actor/0002_12.jpg",
    "beach_0004_14.jpg": "beach/0004_14.jpg",
    "beach_0005_15.jpg": MISSING,
    "big_cat_0010_20.jpg": "big_cat/0010_20.jpg",
    "beach_0003_13.jpg": "beach/0003_13.jpg",
    "cat_0006_16.jpg": "cat/0006_16.jpg",
    "cat_0007_17.jpg": "cat/0007_17.jpg",
    "dog_0009_19": "dog/0009_19.jpg",
}


def write_h5(root, train=H5_TRAIN, test=H5_TEST, pickles=True):
    """BiAM's features/nus_wide_{train,test}.h5 (int8 labels, as BiAM writes them) and name
    lists: img_names.pkl a dict of str (BiAM's form), test_img_names.pkl an array of bytes."""
    h5py = pytest.importorskip("h5py")
    (root / "features").mkdir(exist_ok=True)
    with h5py.File(root / "features" / "nus_wide_train.h5", "w") as f:
        for name, v in train.items():
            f.create_dataset(f"{name}-features", data=np.zeros((4, 2), np.float32))
            f.create_dataset(f"{name}-labels", data=np.asarray(v, np.int8))
    with h5py.File(root / "features" / "nus_wide_test.h5", "w") as f:
        for name, v in test.items():
            f.create_dataset(f"{name}-labels", data=np.asarray(v, np.int8))
            f.create_dataset(f"{name}-labels_81", data=np.asarray(v[8:], np.int8))
    if pickles:
        with open(root / "img_names.pkl", "wb") as f:
            pickle.dump({"img_names": list(train)}, f)
        with open(root / "test_img_names.pkl", "wb") as f:
            pickle.dump(np.array([n.encode() for n in test]), f)


def write_ov_h5_tree(root, pickles=True):
    """Flickr/ images, Concepts81.txt, TagList1k.txt at the root, BiAM's h5 files; no
    AllTags1k.txt (ImageList/ and Groundtruth/ are there but not read)."""
    root, pictures = write_nuswide(root, ENTRIES)
    with open(root / "TagList1k.txt", "w", newline="\r\n") as f:
        f.write("".join(f"{t}\n" for t in TAGS))
    write_h5(root, pickles=pickles)
    return root, pictures


@pytest.mark.parametrize("pickles", [True, False], ids=["name_lists", "h5_keys"])
def test_h5_labels_and_ignored(tmp_path, pickles):
    raw, pictures = write_ov_h5_tree(tmp_path / "raw", pickles)
    builder = datasets.build("nuswide", raw, tmp_path / "built", config="ov")
    meta = builder.info.metadata
    assert meta["class_names"] == CLASS_NAMES
    assert meta["num_seen"] == 8
    assert meta["label_source"] == "h5"
    assert meta["unlisted"] == 0
    assert meta["skipped"] == {
        "train": [f"{raw / 'Flickr' / 'beach' / '0005_15.jpg'}: image file not found"],
        "test": [],
    }
    # actor_0002_12 (train) and dog_0009_19 (test) have no positive seen label.
    assert meta["no_seen_positive"] == {"train": 1, "test": 1}
    for split, table in (("train", H5_TRAIN), ("test", H5_TEST)):
        got = read_split(builder, split)
        assert set(got) == {H5_ENTRY[n] for n in table} - {MISSING}
        for name, v in table.items():
            if H5_ENTRY[name] == MISSING:
                continue
            v = np.asarray(v)
            # Train h5 has no unseen labels: those 5 columns are ignored.
            v = np.concatenate([v, np.zeros(5, int)]) if split == "train" else v
            example = got[H5_ENTRY[name]]
            np.testing.assert_array_equal(example["labels"], v == 1, err_msg=name)
            np.testing.assert_array_equal(example["ignored"], v == 0, err_msg=name)
            assert_image(example["image"], pictures[H5_ENTRY[name]], KINDS[H5_ENTRY[name]])
    train = read_split(builder, "train")
    np.testing.assert_array_equal(
        train["actor/0001_11.jpg"]["ignored"], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    )
    np.testing.assert_array_equal(
        train["actor/0001_11.jpg"]["labels"], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    )


def test_pipeline_label_mask(tmp_path):
    """`ignored` becomes label_mask = not ignored, in eval batches and in training batches;
    other data sets' training batches have no label_mask."""
    raw, _ = write_ov_h5_tree(tmp_path / "raw")
    builder = datasets.build("nuswide", raw, tmp_path / "built", config="ov")
    mean, std = config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD
    test = builder.as_data_source(split="test")
    element = next(test[i] for i in range(len(test)) if test[i]["image_id"] == b"cat/0006_16.jpg")
    want = np.asarray(H5_TEST["cat_0006_16.jpg"]) != 0
    out = pipeline.EvalTransform(32, 13, mean, std).map(element)
    np.testing.assert_array_equal(out["label_mask"], want)
    np.testing.assert_array_equal(out["labels"], np.asarray(H5_TEST["cat_0006_16.jpg"]) == 1)
    aug = augment.chain(config_lib.base_config().data.augment)
    train_out = pipeline.TrainTransform(32, 13, aug, mean, std).random_map(
        element, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(train_out["label_mask"], want)
    plain = {k: v for k, v in element.items() if k != "ignored"}
    assert "label_mask" not in pipeline.TrainTransform(32, 13, aug, mean, std).random_map(
        plain, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(
        pipeline.EvalTransform(32, 13, mean, std).map(plain)["label_mask"], np.ones(13, bool)
    )

    config = ml_collections.ConfigDict(config_lib.base_config().to_dict())
    config.image_size, config.batch_size, config.eval_batch_size = 32, 2, 4
    config.data.worker_count = 0
    batch = next(iter(pipeline.train_dataset(test, config, 13, process=(0, 1))))
    assert batch["label_mask"].shape == (2, 13) and batch["label_mask"].dtype == bool
    by_index = {int(i): m for i, m in zip(batch["index"], batch["label_mask"], strict=True)}
    for i, mask in by_index.items():
        np.testing.assert_array_equal(mask, test[i]["ignored"] == 0)
    batches = list(pipeline.eval_batches(test, config, 13))
    keep = np.concatenate([b["mask"] for b in batches])
    masks = np.concatenate([b["label_mask"] for b in batches])[keep]
    np.testing.assert_array_equal(masks, np.stack([test[i]["ignored"] == 0 for i in range(4)]))


# Bad input: the error names the file (and line) and what was expected.


def small_raw(tmp_path):
    return write_ov_raw(tmp_path / "raw", ENTRIES[:3], ENTRY_TAGS[:3])[0]


def build_ov(raw, out):
    return datasets.build("nuswide", raw, out, config="ov")


def test_missing_tag_list_and_sources_named(tmp_path):
    raw = small_raw(tmp_path)
    (raw / "NUS_WID_Tags" / "TagList1k.txt").unlink()
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "a")
    assert str(e.value) == (
        f"{raw}: missing NUS_WID_Tags/TagList1k.txt (also looked for TagList1k.txt): the "
        "NUS-WIDE tag names, one a line"
    )
    (raw / "NUS_WID_Tags" / "AllTags1k.txt").unlink()
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "b")
    assert str(e.value) == (
        f"{raw}: no NUS-WIDE open-vocabulary labels: expected NUS_WID_Tags/AllTags1k.txt (with "
        "ImageList/ and Groundtruth/AllLabels/) or BiAM's features/nus_wide_train.h5 and "
        "features/nus_wide_test.h5"
    )
    (raw / "features").mkdir()
    (raw / "features" / "nus_wide_test.h5").write_bytes(b"")
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "c")
    assert str(e.value) == (
        f"{raw}: not a NUS-WIDE folder, missing features/nus_wide_train.h5 (expected Flickr, "
        "Concepts81.txt, features/nus_wide_train.h5, features/nus_wide_test.h5)"
    )


def test_bad_tag_files_named(tmp_path):
    raw = small_raw(tmp_path)
    all_tags = raw / "NUS_WID_Tags" / "AllTags1k.txt"
    rows = all_tags.read_text().splitlines()
    all_tags.write_text("\n".join(rows[:2]) + "\n\n")
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "a")
    assert str(e.value) == (
        f"{all_tags}: 2 rows, expected one per ImageList/Imagelist.txt entry (3)"
    )
    all_tags.write_text("\n".join([rows[0], rows[1] + " 0", rows[2]]) + "\n")
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "b")
    assert str(e.value) == (
        f"{all_tags}:2: 13 values, expected 12 (one 0 or 1 per tag of TagList1k.txt)"
    )
    all_tags.write_text("\n".join([rows[0], "", rows[2]]) + "\n")
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "c")
    assert str(e.value) == (
        f"{all_tags}:2: 0 values, expected 12 (one 0 or 1 per tag of TagList1k.txt)"
    )
    all_tags.write_text("\n".join([rows[0], rows[1], "2" + rows[2][1:]]) + "\n")
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "d")
    assert str(e.value) == f"{all_tags}:3: expected 0 or 1, found '2'"
    all_tags.write_text("\n".join(rows) + "\n")
    tag_list = raw / "NUS_WID_Tags" / "TagList1k.txt"
    tag_list.write_text("\n".join([*TAGS[:-1], "sunset"]) + "\n")
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "e")
    assert str(e.value) == f"{tag_list}: tag(s) listed twice: sunset"


def test_bad_h5_labels_named(tmp_path):
    pytest.importorskip("h5py")
    raw, _ = write_ov_h5_tree(tmp_path / "raw")
    path = raw / "features" / "nus_wide_train.h5"
    write_h5(raw, train={**H5_TRAIN, "actor_0002_12.jpg": [-1] * 13})
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "a")
    assert str(e.value) == (
        f"{path}: 'actor_0002_12.jpg-labels' has 13 values, expected 8 (the seen tags: "
        "TagList1k.txt less Concepts81.txt)"
    )
    test_path = raw / "features" / "nus_wide_test.h5"
    write_h5(raw, test={**H5_TEST, "cat_0007_17.jpg": [-1] * 8})
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "b")
    assert str(e.value) == (
        f"{test_path}: 'cat_0007_17.jpg-labels' has 8 values, expected 13 (8 seen tags ++ 5 "
        "concepts)"
    )
    write_h5(raw, test={**H5_TEST, "cat_0007_17.jpg": [2] * 13})
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "c")
    assert str(e.value) == f"{test_path}: 'cat_0007_17.jpg-labels' holds 2, expected 1, -1 or 0"
    write_h5(raw)
    with open(raw / "img_names.pkl", "wb") as f:
        pickle.dump({"img_names": [*H5_TRAIN, "cat_0099_99.jpg"]}, f)
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "d")
    assert str(e.value) == f"{path}: no key 'cat_0099_99.jpg-labels'"
    write_h5(raw, train={**H5_TRAIN, "cat_0006_16.jpg": [-1] * 8})
    with pytest.raises(DataError) as e:
        build_ov(raw, tmp_path / "e")
    assert str(e.value) == f"{test_path}: image 'cat_0006_16.jpg' is also in the train split"

"""The NUS-WIDE builder gives exactly the labels of the Groundtruth files, split officially."""

import numpy as np
import pytest
from image_fixture import assert_image
from nuswide_fixture import CONCEPTS, Entry, write_nuswide

from mlgraph.data import datasets, nuswide
from mlgraph.errors import DataError

ENTRIES = [
    Entry(r"actor\0001_11.jpg", ("sky", "person"), "train", "rgb"),
    Entry(r"actor\0002_12.jpg", (), "train", "rgb"),  # no concept: dropped
    Entry(r"C:\ImageData\Flickr\beach\0003_13.jpg", ("water", "animal"), "test", "gray"),
    Entry(r"beach\0004_14.jpg", ("zebra",), "train", "cmyk"),
    Entry(r"beach\0005_15.jpg", ("sky",), "train", None),  # file missing
    Entry(r"cat\0006_16.jpg", ("animal",), "test", "corrupt"),
    Entry(r"cat\0007_17.jpg", ("animal", "zebra"), "test", "exif"),
    Entry(r"cat\0008_18.jpg", ("person",), "", "rgb"),  # in neither official list
    Entry(r"cat\0009_19.jpg", (), "test", None),  # no concept and no file: dropped, not reported
    Entry(r"dog\0010_20.jpg", ("water",), "test", "png"),
]
KINDS = {e.line.split("Flickr\\")[-1].replace("\\", "/"): e.kind for e in ENTRIES}


def expected_from_files(root):
    """{split: {entry: labels}} read independently from the raw text files."""

    def entries(name):
        return [
            line.strip().replace("\\", "/").split("Flickr/")[-1]
            for line in (root / "ImageList" / name).read_text().splitlines()
        ]

    all_entries = entries("Imagelist.txt")
    concepts = (root / "Concepts81.txt").read_text().split()
    matrix = np.stack(
        [
            np.loadtxt(root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt", dtype=np.uint8)
            for c in concepts
        ],
        axis=1,
    )
    out = {}
    for split, name in (("train", "TrainImagelist.txt"), ("test", "TestImagelist.txt")):
        members = set(entries(name))
        out[split] = {
            e: matrix[i] for i, e in enumerate(all_entries) if e in members and matrix[i].any()
        }
    return out


def read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {source[i]["image_id"].decode(): source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nuswide")
    raw, pictures = write_nuswide(tmp / "raw", ENTRIES)
    return raw, pictures, datasets.build("nuswide", raw, tmp / "built")


def test_labels_equal_groundtruth(built):
    raw, pictures, builder = built
    assert builder.info.metadata["class_names"] == CONCEPTS
    expected = expected_from_files(raw)
    unreadable = {"beach/0005_15.jpg", "cat/0006_16.jpg"}
    for split in ("train", "test"):
        got = read_split(builder, split)
        assert set(got) == set(expected[split]) - unreadable
        for entry, example in got.items():
            np.testing.assert_array_equal(example["labels"], expected[split][entry], err_msg=entry)
            assert_image(example["image"], pictures[entry], KINDS[entry])
    # By hand, in Concepts81 order (sky, animal, water, person, zebra).
    train, test = read_split(builder, "train"), read_split(builder, "test")
    assert sorted(train) == ["actor/0001_11.jpg", "beach/0004_14.jpg"]
    assert sorted(test) == ["beach/0003_13.jpg", "cat/0007_17.jpg", "dog/0010_20.jpg"]
    np.testing.assert_array_equal(train["actor/0001_11.jpg"]["labels"], [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(test["beach/0003_13.jpg"]["labels"], [0, 1, 1, 0, 0])


def test_dropped_and_skipped_counted(built):
    raw, _, builder = built
    meta = builder.info.metadata
    assert meta["skipped"] == {
        "train": [f"{raw / 'Flickr' / 'beach' / '0005_15.jpg'}: image file not found"],
        "test": [meta["skipped"]["test"][0]],
    }
    assert meta["skipped"]["test"][0].startswith(
        f"{raw / 'Flickr' / 'cat' / '0006_16.jpg'}: cannot decode image"
    )
    assert meta["dropped_no_labels"] == {"train": 1, "test": 1}
    assert meta["unlisted"] == 1


def test_strict_stops_at_missing_image(tmp_path):
    raw, _ = write_nuswide(tmp_path / "raw", ENTRIES[:5])
    with pytest.raises(DataError) as e:
        datasets.build("nuswide", raw, tmp_path / "built", strict=True)
    assert str(e.value) == (
        f"{raw / 'Flickr' / 'beach' / '0005_15.jpg'}: image file not found (--strict)"
    )


def test_bad_label_files_named(tmp_path):
    raw, _ = write_nuswide(tmp_path / "raw", ENTRIES[:3])
    labels = raw / "Groundtruth" / "AllLabels" / "Labels_water.txt"
    labels.write_text("0\n0\n")
    with pytest.raises(DataError) as e:
        datasets.build("nuswide", raw, tmp_path / "a")
    assert str(e.value) == (
        f"{labels}: 2 lines, expected one per ImageList/Imagelist.txt entry (3)"
    )
    labels.write_text("0\n1\n2\n")
    with pytest.raises(DataError) as e:
        datasets.build("nuswide", raw, tmp_path / "b")
    assert str(e.value) == f"{labels}:3: expected 0 or 1, found '2'"
    labels.unlink()
    with pytest.raises(DataError) as e:
        datasets.build("nuswide", raw, tmp_path / "c")
    assert str(e.value) == (
        f"{raw / 'Groundtruth' / 'AllLabels'}: missing label file(s) Labels_water.txt"
    )


def test_missing_files_named(tmp_path):
    (tmp_path / "Flickr").mkdir()
    (tmp_path / "ImageList").mkdir()
    (tmp_path / "ImageList" / "Imagelist.txt").write_text("")
    with pytest.raises(DataError) as e:
        nuswide.check_manual_dir(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: not a NUS-WIDE folder, missing Concepts81.txt, "
        "ImageList/TrainImagelist.txt, ImageList/TestImagelist.txt, Groundtruth/AllLabels "
        "(expected Flickr/, Concepts81.txt, ImageList/{Imagelist,TrainImagelist,TestImagelist}"
        ".txt, Groundtruth/AllLabels/)"
    )


def test_entry_normalisation():
    assert nuswide.normalize_entry("actor\\0001_2124494179.jpg\r\n") == "actor/0001_2124494179.jpg"
    assert nuswide.normalize_entry(r"C:\ImageData\Flickr\actor\0001_1.jpg") == "actor/0001_1.jpg"
    assert nuswide.normalize_entry("Flickr/a/b.jpg") == "a/b.jpg"

"""The custom builder gives exactly the labels of its train.txt / test.txt lines."""

import numpy as np
import pytest
from custom_fixture import CLASSES, write_custom
from image_fixture import assert_image

from mlgraph.data import custom, datasets
from mlgraph.errors import DataError

LINES = {
    "train": [
        "images/a.jpg\tcat,traffic light",
        "images/sub/b.jpg\t",  # empty label field: an image without labels
        "images/c.jpg\tdog, unicorn",  # unknown label: skipped
        "",
        "images/d.jpg\t dog ,cat,",  # spaces and a trailing comma
        "images/e.jpg\tcat",  # corrupt image
        "images/a.jpg\tdog",  # listed twice
        "images/f.jpg",  # no tab: no labels
    ],
    "test": ["images/g.jpg\ttraffic light,dog", "images/missing.jpg\tcat"],
}
IMAGES = {
    "images/a.jpg": "rgb",
    "images/sub/b.jpg": "gray",
    "images/c.jpg": "rgb",
    "images/d.jpg": "cmyk",
    "images/e.jpg": "corrupt",
    "images/f.jpg": "png",
    "images/g.jpg": "exif",
}


def expected_from_txt(root, split, classes):
    """{path: labels} for the usable lines of a split file, read independently."""
    out = {}
    for line in (root / f"{split}.txt").read_text().splitlines():
        if not line:
            continue
        path, _, field = line.partition("\t")
        names = [n.strip() for n in field.split(",") if n.strip()]
        usable = all(n in classes for n in names) and path not in out
        if usable and IMAGES.get(path) not in (None, "corrupt"):
            out[path] = np.array([c in names for c in classes], np.uint8)
    return out


def read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {source[i]["image_id"].decode(): source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom")
    raw, pictures = write_custom(tmp / "raw", LINES, IMAGES)
    return raw, pictures, datasets.build("custom", raw, tmp / "built")


def test_labels_equal_txt(built):
    raw, pictures, builder = built
    classes = (raw / "classes.txt").read_text().split("\n")[:3]
    assert builder.info.metadata["class_names"] == classes == CLASSES
    for split in ("train", "test"):
        got = read_split(builder, split)
        want = expected_from_txt(raw, split, classes)
        assert set(got) == set(want)
        for path, example in got.items():
            np.testing.assert_array_equal(example["labels"], want[path], err_msg=path)
            assert_image(example["image"], pictures[path], IMAGES[path])
    train = read_split(builder, "train")
    # By hand, in classes.txt order (dog, traffic light, cat).
    assert sorted(train) == ["images/a.jpg", "images/d.jpg", "images/f.jpg", "images/sub/b.jpg"]
    np.testing.assert_array_equal(train["images/a.jpg"]["labels"], [0, 1, 1])
    np.testing.assert_array_equal(train["images/d.jpg"]["labels"], [1, 0, 1])
    np.testing.assert_array_equal(train["images/sub/b.jpg"]["labels"], [0, 0, 0])
    np.testing.assert_array_equal(train["images/f.jpg"]["labels"], [0, 0, 0])
    np.testing.assert_array_equal(read_split(builder, "test")["images/g.jpg"]["labels"], [1, 1, 0])


def test_skipped_reported_with_line(built):
    raw, _, builder = built
    skipped = builder.info.metadata["skipped"]
    assert len(skipped["train"]) == 3
    assert (
        skipped["train"][0]
        == f"{raw / 'train.txt'}:3: unknown label 'unicorn' (not in classes.txt)"
    )
    assert skipped["train"][1].startswith(
        f"{raw / 'train.txt'}:6: {raw / 'images' / 'e.jpg'}: cannot decode image"
    )
    assert skipped["train"][2] == (
        f"{raw / 'train.txt'}:7: image images/a.jpg already listed on line 1"
    )
    assert skipped["test"] == [
        f"{raw / 'test.txt'}:2: {raw / 'images' / 'missing.jpg'}: image file not found"
    ]


def test_strict_stops_at_unknown_label(tmp_path):
    lines = {"train": ["a.jpg\tcat", "b.jpg\tcat,Dog"], "test": ["a.jpg\tdog"]}
    raw, _ = write_custom(tmp_path / "raw", lines, {"a.jpg": "rgb", "b.jpg": "rgb"})
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "built", strict=True)
    assert str(e.value) == (
        f"{raw / 'train.txt'}:2: unknown label 'Dog' (not in classes.txt) (--strict)"
    )


def test_bad_classes_and_missing_files_named(tmp_path):
    with pytest.raises(DataError) as e:
        custom.check_manual_dir(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: not a custom data set folder, missing classes.txt, train.txt, test.txt "
        "(expected classes.txt, train.txt and test.txt of <path><TAB><label>,<label>,... lines)"
    )
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n\ndog\n")
    with pytest.raises(DataError) as e:
        custom.read_classes(classes)
    assert str(e.value) == f"{classes}:4: class 'dog' listed twice"
    classes.write_text("dog\ncat, kitten\n")
    with pytest.raises(DataError) as e:
        custom.read_classes(classes)
    assert str(e.value) == f"{classes}:2: class name 'cat, kitten' contains a comma"


def test_latin1_classes_and_space_separated_lines_say_what_to_fix(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("dog\ncaf\xe9\n".encode("latin1"))
    with pytest.raises(DataError) as e:
        custom.read_classes(classes)
    assert str(e.value) == (
        f"{classes}:2: not UTF-8 text (byte 0xe9 at offset 7); save the file as UTF-8"
    )
    lines = {"train": ["a.jpg\tcat", "b.jpg cat,dog"], "test": ["a.jpg\tdog"]}
    raw, _ = write_custom(tmp_path / "raw", lines, {"a.jpg": "rgb", "b.jpg": "rgb"})
    with pytest.raises(DataError) as e:
        datasets.build("custom", raw, tmp_path / "built", strict=True)
    assert str(e.value) == (
        f"{raw / 'train.txt'}:2: image {raw / 'b.jpg cat,dog'} not found, and the line has no "
        "tab: separate the image path from its labels with a tab, not spaces (--strict)"
    )

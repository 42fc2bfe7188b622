"""The VOC builders give exactly the labels and difficult masks the annotation XMLs say."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from image_fixture import assert_image
from voc_fixture import Img, Obj, write_voc

from mlgraph.data import datasets, voc
from mlgraph.errors import DataError

NAMES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()

TRAIN07 = [
    # Difficult and non-difficult chairs; a person only as difficult, with part names inside.
    Img("000005", [Obj("chair"), Obj("chair", 1), Obj("person", 1, ("head", "hand"))], "rgb"),
    Img("000007", [Obj("car"), Obj(" Dog\n")], "gray"),  # case and spaces as in some XMLs
    Img("000009", [Obj("cat", None)], "cmyk"),  # no <difficult> tag
    Img("000012", [Obj("aeroplane", 1)], "png"),
    Img("000016", [Obj("bird")], "corrupt"),
]
VAL07 = [
    Img("000017", [Obj("horse"), Obj("person", 0, ("foot",))], "exif"),
    Img("000019", [Obj("unicorn")], "rgb"),
    Img("000020", [Obj("sheep")], None),  # listed, annotated, no JPEG
    Img("000021", None, "rgb"),  # listed, JPEG, no XML
]
TEST07 = [
    Img("000001", [Obj("dog"), Obj("person", 1)], "rgb"),
    Img("000002", [Obj("train", 1), Obj("train", 0)], "cmyk"),
    Img("000003", [Obj("sofa", 1)], "gray"),  # only difficult: no test label at all
    Img("000004", [Obj("tvmonitor"), Obj("bottle"), Obj("pottedplant", 1)], "exif"),
]
SPLITS07 = {"train": TRAIN07, "val": VAL07, "trainval": TRAIN07 + VAL07, "test": TEST07}
KINDS = {im.image_id: im.kind for imgs in SPLITS07.values() for im in imgs}


def expected_from_xml(xml_path, training):
    """(labels, difficult) read independently: every object's name and difficult flag."""
    objects = [
        (o.find("name").text.strip().lower(), int(o.findtext("difficult", default="0")))
        for o in ET.parse(xml_path).getroot().iter("object")
    ]
    any_instance = {n for n, _ in objects}
    clear = {n for n, d in objects if d == 0}
    labels = any_instance if training else clear
    y = np.array([n in labels for n in NAMES], np.uint8)
    diff = np.array([n in any_instance - clear for n in NAMES], np.uint8)
    return y, diff


def read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {source[i]["image_id"].decode(): source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def voc2007(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("voc2007")
    raw, pictures = write_voc(tmp / "raw", "2007", SPLITS07)
    builder = datasets.build("voc2007", raw, tmp / "built")
    return raw, pictures, builder


def test_class_names_and_splits(voc2007):
    _, _, builder = voc2007
    assert builder.info.metadata["class_names"] == NAMES == list(voc.CLASSES)
    assert set(builder.info.splits) == {"train", "val", "trainval", "test"}


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_labels_and_difficult_equal_xml(voc2007, split):
    raw, pictures, builder = voc2007
    base = raw / "VOCdevkit" / "VOC2007"
    got = read_split(builder, split)
    readable = {"000005", "000007", "000009", "000012", "000017", "000001", "000002", "000003"}
    readable |= {"000004"}
    want_ids = [im.image_id for im in SPLITS07[split] if im.image_id in readable]
    assert sorted(got) == sorted(want_ids)
    for image_id, example in got.items():
        y, diff = expected_from_xml(
            base / "Annotations" / f"{image_id}.xml", training=split in ("train", "trainval")
        )
        np.testing.assert_array_equal(example["labels"], y, err_msg=image_id)
        np.testing.assert_array_equal(example["difficult"], diff, err_msg=image_id)
        assert_image(example["image"], pictures[image_id], KINDS[image_id])


def named(vector):
    return [NAMES[i] for i in np.flatnonzero(vector)]


def test_difficult_conventions_by_hand(voc2007):
    _, _, builder = voc2007
    train, test = read_split(builder, "train"), read_split(builder, "test")
    # Training split: difficult-only classes are positive and flagged.
    assert named(train["000005"]["labels"]) == ["chair", "person"]
    assert named(train["000005"]["difficult"]) == ["person"]
    assert named(train["000007"]["labels"]) == ["car", "dog"]
    assert named(train["000012"]["labels"]) == ["aeroplane"]
    assert named(train["000012"]["difficult"]) == ["aeroplane"]
    # Test split: positive only with a non-difficult instance; difficult-only pairs flagged.
    assert named(test["000001"]["labels"]) == ["dog"]
    assert named(test["000001"]["difficult"]) == ["person"]
    assert named(test["000002"]["labels"]) == ["train"]
    assert named(test["000002"]["difficult"]) == []
    assert named(test["000003"]["labels"]) == []
    assert named(test["000003"]["difficult"]) == ["sofa"]
    assert named(test["000004"]["labels"]) == ["bottle", "tvmonitor"]
    assert named(test["000004"]["difficult"]) == ["pottedplant"]


def test_skipped_reported_by_path(voc2007):
    raw, _, builder = voc2007
    base = raw / "VOCdevkit" / "VOC2007"
    skipped = builder.info.metadata["skipped"]
    assert {s: len(v) for s, v in skipped.items()} == {
        "train": 1,
        "val": 3,
        "trainval": 4,
        "test": 0,
    }
    assert skipped["train"][0].startswith(f"{base / 'JPEGImages' / '000016.jpg'}: cannot decode")
    assert skipped["val"] == [
        f"{base / 'Annotations' / '000019.xml'}: unknown class 'unicorn' (expected one of the 20 "
        f"VOC classes: {', '.join(NAMES)})",
        f"{base / 'JPEGImages' / '000020.jpg'}: image file not found",
        f"{base / 'Annotations' / '000021.xml'}: annotation file not found",
    ]
    assert skipped["trainval"] == skipped["train"] + skipped["val"]


TRAIN12 = [
    Img("2008_000002", [Obj("person", None, ("head", "hand", "foot")), Obj("Bicycle", None)]),
    Img("2008_000003", [Obj("boat", 1), Obj("boat", 0)], "png"),
]
VAL12 = [
    Img("2008_000008", [Obj("horse", 1), Obj("person", 0)], "gray"),
    Img("2009_000001", [Obj("bus")], "cmyk"),
]


def test_voc2012_splits_and_strict(tmp_path):
    raw, _ = write_voc(
        tmp_path / "raw", "2012", {"train": TRAIN12, "val": VAL12, "trainval": TRAIN12 + VAL12}
    )
    builder = datasets.build("voc2012", raw, tmp_path / "built")
    assert set(builder.info.splits) == {"train", "val", "trainval"}
    train, val, trainval = (read_split(builder, s) for s in ("train", "val", "trainval"))
    assert sorted(train) == ["2008_000002", "2008_000003"]
    assert named(train["2008_000002"]["labels"]) == ["bicycle", "person"]
    assert named(train["2008_000003"]["labels"]) == ["boat"]
    # The same image: its difficult horse is a positive for training, not for evaluation.
    assert named(val["2008_000008"]["labels"]) == ["person"]
    assert named(trainval["2008_000008"]["labels"]) == ["horse", "person"]
    assert named(val["2008_000008"]["difficult"]) == ["horse"]
    assert named(trainval["2008_000008"]["difficult"]) == ["horse"]
    assert builder.info.metadata["skipped"] == {"train": [], "val": [], "trainval": []}

    xml = raw / "VOCdevkit" / "VOC2012" / "Annotations" / "2009_000001.xml"
    xml.write_text(xml.read_text().replace("<name>bus</name>", "<name>unicorn</name>"))
    with pytest.raises(DataError) as e:
        datasets.build("voc2012", raw, tmp_path / "strict", strict=True)
    assert str(e.value) == (
        f"{xml}: unknown class 'unicorn' (expected one of the 20 VOC classes: "
        f"{', '.join(NAMES)}) (--strict)"
    )


def test_missing_files_named(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n")
    with pytest.raises(DataError) as e:
        voc.Voc2007.check_manual_dir(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: not a VOC2007 folder, missing VOCdevkit/VOC2007/JPEGImages, "
        "VOCdevkit/VOC2007/ImageSets/Main/train.txt, VOCdevkit/VOC2007/ImageSets/Main/val.txt, "
        "VOCdevkit/VOC2007/ImageSets/Main/test.txt (expected VOCdevkit/VOC2007/Annotations/, "
        "JPEGImages/, ImageSets/Main/{train,val,trainval,test}.txt)"
    )


def test_malformed_xml_and_bad_difficult_named(tmp_path):
    bad = tmp_path / "a.xml"
    bad.write_text("<annotation><object><name>cat</name>")
    with pytest.raises(voc.AnnotationError, match=r"a\.xml: not valid XML \(no element found"):
        voc.read_annotation(bad)
    bad.write_text(
        "<annotation><object><name>cat</name><difficult>2</difficult></object></annotation>"
    )
    with pytest.raises(voc.AnnotationError) as e:
        voc.read_annotation(bad)
    assert str(e.value) == (
        f"{bad}: <object> 0 ('cat') has <difficult>2</difficult>, expected 0 or 1"
    )


def test_build_cli_prints_summary(tmp_path):
    raw, _ = write_voc(tmp_path / "raw", "2007", SPLITS07)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mlgraph.data.build", "voc2007", "--manual_dir", str(raw)]
        + ["--data_dir", str(tmp_path / "built")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("voc2007 (20 classes) in ") for line in lines), proc.stdout
    # train: chair+person, car+dog, cat, aeroplane; test: dog, train, none, bottle+tvmonitor.
    for expected in (
        "  train: 4 images, 1.500 labels/image, 1 skipped",
        "  val: 1 images, 2.000 labels/image, 3 skipped",
        "  trainval: 5 images, 1.600 labels/image, 4 skipped",
        "  test: 4 images, 1.000 labels/image, 0 skipped",
    ):
        assert any(line.startswith(expected) for line in lines), (expected, proc.stdout)
    base = raw / "VOCdevkit" / "VOC2007"
    assert f"    skipped {base / 'JPEGImages' / '000020.jpg'}: image file not found" in lines


def test_difficult_pairs_left_out_of_metrics(voc2007):
    """The eval pipeline turns `difficult` into a label mask and the metrics honour it."""
    import ml_collections

    from mlgraph import config_lib, evaluation, metrics
    from mlgraph.data import pipeline

    _, _, builder = voc2007
    source = builder.as_data_source(split="test")
    config = ml_collections.ConfigDict(config_lib.base_config().to_dict())
    config.image_size, config.eval_batch_size = 32, 8
    batches = list(pipeline.eval_batches(source, config, len(NAMES)))
    keep = np.concatenate([b["mask"] for b in batches])
    label_mask = np.concatenate([b["label_mask"] for b in batches])[keep]
    labels = np.concatenate([b["labels"] for b in batches])[keep]
    ids = [source[i]["image_id"].decode() for i in range(len(source))]
    want = {"000001": ["person"], "000002": [], "000003": ["sofa"], "000004": ["pottedplant"]}
    for row, image_id in enumerate(ids):
        masked = [NAMES[c] for c in np.flatnonzero(~label_mask[row])]
        assert masked == want[image_id], image_id

    # A perfect ranking plus one confident score on a difficult-only pair (person in 000001):
    # masked, it is no false positive; unmasked, it costs overall precision.
    scores = labels * 0.9 + 0.05
    scores[ids.index("000001"), NAMES.index("person")] = 1.0
    with_mask = evaluation.eval_metrics(
        {"scores": [scores], "labels": labels, "label_mask": label_mask}, prefixes=("",)
    )
    assert with_mask["mAP"] == pytest.approx(100.0)
    assert with_mask["OP"] == pytest.approx(100.0)
    unmasked = evaluation.eval_metrics({"scores": [scores], "labels": labels}, prefixes=("",))
    assert unmasked["OP"] == pytest.approx(100.0 * 4 / 5)
    assert metrics.mean_average_precision(scores, labels > 0.5, label_mask) == pytest.approx(100)


def test_train_difficult_negative_drops_difficult_only_classes(voc2007):
    """SSGRL's training labels (data.train_difficult='negative'); the default keeps them."""
    import ml_collections

    from mlgraph import config_lib
    from mlgraph.data import augment, pipeline
    from mlgraph.errors import ConfigError

    _, _, builder = voc2007
    source = builder.as_data_source(split="train")
    element = next(source[i] for i in range(len(source)) if source[i]["image_id"] == b"000005")
    aug = augment.chain(config_lib.base_config().data.augment)
    mean, std = config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD
    for drop, want in ((False, ["chair", "person"]), (True, ["chair"])):
        t = pipeline.TrainTransform(32, len(NAMES), aug, mean, std, drop_difficult=drop)
        labels = t.random_map(element, np.random.default_rng(0))["labels"]
        assert named(labels) == want

    config = ml_collections.ConfigDict(config_lib.base_config().to_dict())
    config.data.train_difficult = "negative"
    coco_like = [{"image": np.zeros((8, 8, 3), np.uint8), "labels": np.zeros(3, np.uint8)}]
    config.data.name = "coco2014"
    with pytest.raises(ConfigError) as e:
        pipeline.train_dataset(coco_like, config, 3, process=(0, 1))
    assert str(e.value) == (
        "config.data.train_difficult='negative': data set 'coco2014' has no 'difficult' "
        "feature (voc2007 and voc2012 have)"
    )
    config.data.train_difficult = "drop"
    with pytest.raises(ConfigError, match="expected 'positive' or 'negative'"):
        pipeline.train_dataset(coco_like, config, 3, process=(0, 1))

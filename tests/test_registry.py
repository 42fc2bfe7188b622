"""One data-set registry (mlgraph.data.registry): a data set registered outside the package
reaches the builder, the recipes, the single-positive draws and the configs' checks with no
other edit."""

from __future__ import annotations

import pytest
from custom_fixture import write_custom
from toy.dataset import TOY
from train_helpers import num_classes_of

from mlgraph import config_lib, recipes
from mlgraph.data import datasets, observed, registry
from mlgraph.errors import ConfigError

IMAGES = {p: "rgb" for p in ("img/b.jpg", "img/a10.jpg", "img/a9.jpg", "img/c.jpg")}
LINES = {
    "train": ["img/b.jpg\tdog,cat", "img/a9.jpg\tdog", "img/a10.jpg\tcat", "img/c.jpg\tcat"],
    "test": ["img/b.jpg\tdog,cat,traffic light", "img/a9.jpg\tdog"],
}


@pytest.fixture
def toy_registered():
    registry.register(TOY)
    yield TOY
    del registry.DATASETS[TOY.name]


def test_a_registered_data_set_is_used_everywhere(toy_registered, tmp_path):
    raw, _ = write_custom(tmp_path / "raw", LINES, IMAGES)
    datasets.build("toy_shapes", raw, tmp_path / "built")

    # The recipes' data fields and the configs' class count come from the row.
    c = config_lib.base_config()
    recipes.set_data(c, "toy_shapes")
    assert (c.data.name, c.data.train_split, c.data.eval_split) == ("toy_shapes", "train", "test")
    assert num_classes_of(c) == 3
    c.data.data_dir = str(tmp_path / "built")
    dataset = datasets.open_dataset(c.data)
    assert (dataset.name, dataset.num_classes) == ("toy_shapes", 3)
    assert len(dataset.sources["train"]) == 4

    # The draws follow the row's rules, with the raw order its reader gives (the list's).
    source = observed.read_source_order("toy_shapes", raw, "train")
    assert source.image_ids == ("img/b.jpg", "img/a9.jpg", "img/a10.jpg", "img/c.jpg")
    y = observed.observed_labels(dataset, "train", "cole", source_order=source)
    assert y.sum(axis=1).tolist() == [1, 1, 1, 1]
    lines = observed.observed_path(dataset, "train", "cole").read_text().splitlines()
    rows = [line.split("\t")[0] for line in lines if not line.startswith("#")]
    assert rows == list(source.image_ids)
    assert "# rows: the order of ImageList/Imagelist.txt (Cole: the provided files' order)" in (
        lines
    )


def test_unknown_names(toy_registered, tmp_path):
    with pytest.raises(ConfigError) as e:
        registry.get("coco2017")
    assert str(e.value) == (
        "config.data.name='coco2017': unknown data set; known: coco2014, cub, custom, demo, "
        "digits_mosaic, nuswide, nuswide_ov, toy_shapes, voc2007, voc2012"
    )
    with pytest.raises(ConfigError, match="no raw order to read"):
        observed.read_source_order("custom", tmp_path, "train")
    with pytest.raises(ConfigError, match="spml_rules='openimages'; expected one of coco, voc"):
        registry.DataSet("oi", "x:Y", "train", "test", 200, spml_rules="openimages")


def test_every_row_resolves():
    for row in registry.DATASETS.values():
        assert row.builder_class().name in {
            "coco2014",
            "voc2007",
            "voc2012",
            "nus_wide",
            "cub2011",
            "custom",
        }
        assert (row.raw_order_reader() is None) == (row.name == "custom")
    # Rows that share a builder share its single-positive rules.
    by_builder = {}
    for row in registry.DATASETS.values():
        by_builder.setdefault(row.builder, set()).add(row.spml_rules)
    assert all(len(rules) == 1 for rules in by_builder.values())

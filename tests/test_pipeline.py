"""Training batches: per-process shards are disjoint and cover each epoch exactly once."""

import numpy as np
import pytest
from train_helpers import tiny_config

from mlgraph.data import datasets, pipeline


@pytest.fixture(scope="module")
def source(tiny_coco_dir):
    return datasets.make_builder("coco2014", tiny_coco_dir).as_data_source(split="train")


def first_epoch_ids(source, config, process):
    """Image ids of the batches one process reads during the first epoch."""
    it = iter(pipeline.train_dataset(IdSource(source), config, 4, process=process))
    batches = len(source) // config.batch_size
    mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
    ids = []
    for _ in range(batches):
        images = next(it)["image"]
        ids += [int(round(v)) for v in ((images[:, 0, 0] * std + mean) * 255)[:, 0]]
    return ids


class IdSource:
    """The source with each image replaced by a constant image whose value is its id (< 256),
    so the id survives resize, flip and normalisation."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        element = dict(self.source[i])
        element["image"] = np.full((8, 8, 3), int(element["image_id"]), np.uint8)
        return element


def test_two_process_shards_cover_epoch_once(source, tmp_path):
    config = tiny_config(tmp_path)
    config.batch_size = 8
    ids0 = first_epoch_ids(source, config, (0, 2))
    ids1 = first_epoch_ids(source, config, (1, 2))
    all_ids = sorted(int(source[i]["image_id"]) for i in range(len(source)))
    assert len(ids0) == len(ids1) == 16
    assert not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == all_ids
    # One process alone reads the same global stream: the union of the two shards, in order.
    ids = first_epoch_ids(source, config, (0, 1))
    merged = [x for pair in zip(ids0, ids1, strict=True) for x in pair]
    assert np.array_equal(ids, merged)

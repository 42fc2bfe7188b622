"""Every file in configs/ loads, and its model and optimizer build for its data set's classes.

Built abstractly (`nnx.eval_shape`: shapes only, no weights), with the asset names ('minilm'
label vectors, 'train_labels' graphs) replaced by files of the right shape, since resolving
them needs the built data set. This keeps the paper configs, which need data no CI machine has,
from rotting.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import REPO, fake_assets, load_config, num_classes_of

from mlgraph import models, train_state

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def test_the_issue_configs_exist():
    methods = ("salgl", "ssgrl", "mlgcn", "q2l")
    want = {f"{m}_{s}" for m in methods for s in ("coco", "voc2007", "demo")} | {"q2l_coco576"}
    assert want <= set(CONFIGS), want - set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name, tmp_path: pathlib.Path):
    c = load_config(name)
    num_classes = num_classes_of(c)
    fake_assets(c, num_classes, tmp_path)
    model = nnx.eval_shape(lambda: models.create(c, num_classes=num_classes, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    tx = train_state.make_optimizer(models.method_module(c.model.name), c, 1000, params)
    jax.eval_shape(tx.init, params)
    images = jax.ShapeDtypeStruct((2, c.image_size, c.image_size, 3), np.float32)
    out = nnx.eval_shape(lambda m, x: m(x), model, images)
    assert out["logits"].shape == (2, num_classes)

"""The single-positive protocol end to end on the tiny COCO set: the SPML method's losses train
on the observed single positives read by example index, ROLE's label estimator and EM+APL's
pseudo-negatives live in the checkpointed state (stop/resume bit-identical), the held-out
validation split picks the checkpoint, and early stopping ends a run that stops improving."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from train_helpers import TINY_COCO_TRAIN, final_run, tiny_config

from mlgraph import recipes, train
from mlgraph.data import datasets
from mlgraph.errors import ConfigError


def _config(data_dir, loss: str, **changes):
    c = tiny_config(data_dir, total_steps=6)
    c.batch_size = 8
    c.data.observed = "cole"
    c.data.val_fraction = 0.2
    c.best_metric = "val/spml_mAP"
    c.ema.decay = 0.0
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 1e-2
    c.loss = recipes.loss_config(
        "spml", name=loss, expected_num_pos=2.0, alpha=0.1, beta=0.5, warmup_epochs=1
    )
    c.model = recipes.model_config(
        "spml", backbone="simple_cnn", backbone_kwargs={"widths": (8, 16)}
    )
    c.update(changes)
    return c


def test_training_split_holds_out_a_fifth_with_single_positives(tiny_coco_dir):
    config = _config(tiny_coco_dir, "an")
    dataset = datasets.open_dataset(config.data)
    split = datasets.training_split(dataset, config.data)
    n_val = round(0.2 * TINY_COCO_TRAIN)
    assert (split.num_examples, len(split.holdout)) == (TINY_COCO_TRAIN - n_val, n_val)
    assert split.observed.shape == (split.num_examples, 4)
    np.testing.assert_array_equal(split.observed.sum(1), 1.0)
    # Each observed positive is one of the example's true labels.
    for i in range(split.num_examples):
        labels = np.asarray(split.source[i]["labels"])
        assert labels[split.observed[i].argmax()] == 1


def test_em_apl_pseudo_labels_survive_stop_and_resume(tiny_coco_dir, tmp_path):
    # 26 training images in batches of 8: epochs end after steps 4 (32 >= 26) and 7.
    config = _config(tiny_coco_dir, "em_apl", total_steps=8, eval_every_steps=4)
    config.num_epochs = 3.0  # the quotas' E
    train.run(config, tmp_path / "once")
    train.run(
        _config(
            tiny_coco_dir,
            "em_apl",
            total_steps=8,
            eval_every_steps=4,
            stop_at_step=5,
            num_epochs=3.0,
        ),
        tmp_path / "twice",
    )
    train.run(config, tmp_path / "twice")
    once, once_lines = final_run(tmp_path / "once")
    twice, twice_lines = final_run(tmp_path / "twice")
    jax.tree.map(np.testing.assert_array_equal, once, twice)
    assert [x for x in once_lines if x["step"] == 8] == [x for x in twice_lines if x["step"] == 8]
    observed, quotas = once["extra"]["observed"], once["extra"]["apl_quotas"]
    # Two passes (after epochs 1 and 2), each making quota[c] unknowns of class c negative.
    negatives = (observed < 0).sum(0)
    np.testing.assert_array_equal(negatives, np.minimum(2 * quotas, (observed <= 0).sum(0)))
    assert negatives.sum() > 0 and (observed[observed < 0] >= -1).all()
    assert (observed == 1).sum() == observed.shape[0]  # the positives are untouched


def test_role_trains_its_label_estimator(tiny_coco_dir, tmp_path):
    config = _config(tiny_coco_dir, "role", total_steps=3, eval_every_steps=3)
    train.run(config, tmp_path / "w")
    state, _ = final_run(tmp_path / "w")
    phi, observed = state["extra"]["phi"], state["extra"]["observed"]
    assert phi.shape == observed.shape
    # Observed positives start at logit(0.995) = 5.293 and move; Adam counted 3 steps.
    assert np.abs(phi[observed == 1] - 5.293).max() > 0
    counts = [
        int(v)
        for path, v in jax.tree_util.tree_leaves_with_path(state["extra"]["phi_opt"])
        if "count" in jax.tree_util.keystr(path)
    ]
    assert counts == [3]


def test_selection_by_validation_and_early_stop(tiny_coco_dir, tmp_path):
    config = _config(tiny_coco_dir, "an", total_steps=12, eval_every_steps=2, early_stop=True)
    config.optimizer.lr = 0.0  # nothing improves: the second evaluation stops the run
    train.run(config, tmp_path / "w")
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "val/spml_mAP" in x]
    assert [x["step"] for x in evals] == [2, 4] and evals[-1]["early_stop"] == 1.0
    assert "eval/spml_mAP" in evals[0] and "val/images" in evals[0]
    # With EMA decay 0 the EMA is the model: scored once, reported under both names.
    assert evals[0]["val/ema_spml_mAP"] == evals[0]["val/spml_mAP"]
    # A second run says it is finished instead of training on.
    again = train.run(config, tmp_path / "w")
    assert again["val/spml_mAP"] == evals[-1]["val/spml_mAP"]


def test_spml_config_errors(tiny_coco_dir, tmp_path):
    config = _config(tiny_coco_dir, "an", best_metric="val/nope")
    with pytest.raises(ConfigError, match=r"config.best_metric='val/nope': expected one of"):
        train.run(config, tmp_path / "a")
    config = _config(tiny_coco_dir, "an")
    config.data.observed = ""
    with pytest.raises(ConfigError, match=r"config.loss.name='an' trains on single positives"):
        train.run(config, tmp_path / "b")


def test_linear_init_continues_from_the_linear_phase(tiny_coco_dir, tmp_path):
    linear = _config(tiny_coco_dir, "role", total_steps=3, eval_every_steps=3)
    linear.optimizer.frozen = ("backbone/.*",)
    linear.model.frozen_bn = True
    train.run(linear, tmp_path / "linear")
    first, _ = final_run(tmp_path / "linear")
    # The end-to-end phase starts from the linear phase's weights and label estimates (lr 0:
    # one step leaves them as they were), with a fresh optimizer.
    e2e = _config(tiny_coco_dir, "role", total_steps=1, eval_every_steps=1)
    e2e.init_from = str(tmp_path / "linear")
    e2e.optimizer.lr = 0.0
    train.run(e2e, tmp_path / "e2e")
    second, _ = final_run(tmp_path / "e2e")
    jax.tree.map(np.testing.assert_array_equal, second["params"], first["params"])
    np.testing.assert_array_equal(second["extra"]["phi"], first["extra"]["phi"])
    counts = [
        int(v)
        for path, v in jax.tree_util.tree_leaves_with_path(second["extra"]["phi_opt"])
        if "count" in jax.tree_util.keystr(path)
    ]
    assert counts == [1]
    other = _config(tiny_coco_dir, "role", total_steps=1)
    other.model = recipes.model_config("baseline")
    other.loss = recipes.loss_config("baseline")
    other.init_from = str(tmp_path / "linear")
    with pytest.raises(ConfigError, match="the workdir trained a 'spml' model, but"):
        train.run(other, tmp_path / "other")

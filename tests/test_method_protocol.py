"""The method protocol (`mlgraph.models`): every method module defines what it must, builds
from its demo and paper configs, and its loss runs; a toy method using every optional part
(two optimizers, its own step, per-example state, an epoch hook) trains, stops, resumes and
ends bit-identical to an uninterrupted run; checkpoints at `checkpoint_every_steps`."""

from __future__ import annotations

import inspect
import json
import pathlib
import pkgutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from train_helpers import TINY_COCO_TRAIN, fake_assets, final_run, load_config, tiny_config

import mlgraph.models
from mlgraph import checkpointing, models, recipes, train
from mlgraph.errors import ConfigError

# Modules of mlgraph/models that hold shared parts, not methods.
SHARED = {"attention", "backbones", "cam", "common", "graph", "layers"}
METHODS = sorted(
    m.name for m in pkgutil.iter_modules(mlgraph.models.__path__) if m.name not in SHARED
)
# Each method's demo config and a paper config.
CONFIGS = {
    "baseline": ("baseline_demo",),
    "salgl": ("salgl_demo", "salgl_coco"),
    "ssgrl": ("ssgrl_demo", "ssgrl_coco"),
    "mlgcn": ("mlgcn_demo", "mlgcn_coco"),
    "q2l": ("q2l_demo", "q2l_coco"),
    "spml": ("spml_demo", "spml_coco"),
    "scob": ("scob_demo", "scob_coco"),
    "sigrl": ("sigrl_demo", "sigrl_nuswide_ov", "sigrl_spml_voc2012", "sigrl_spml_coco"),
}


def test_every_method_is_listed():
    assert METHODS == sorted(CONFIGS)


@pytest.mark.parametrize("name", METHODS)
def test_method_module_follows_the_protocol(name):
    mod = models.method_module(name)
    assert inspect.isclass(mod.Model) and issubclass(mod.Model, nnx.Module)
    assert list(inspect.signature(mod.loss_fn).parameters) == ["outputs", "batch", "config"]
    # Every config field has a default and survives config.json.
    fields = models.field_defaults(name)
    assert json.loads(json.dumps(fields)) == json.loads(
        ml_collections.ConfigDict(fields).to_json_best_effort()
    )
    hooks = {
        "ema_live_paths": ["config"],
        "make_optimizer": ["config", "total_steps", "params"],
        "make_train_step": ["ctx"],
        "init_extra": ["config", "training"],
        "epoch_end": ["ctx", "state", "epoch"],
        "eval_views": ["config", "extra"],
        "view_metrics": ["scores", "labels", "mask"],
        "view_metric_names": [],
    }
    assert set(hooks) == set(models.OPTIONAL)
    for hook, params in hooks.items():
        if hasattr(mod, hook):
            assert list(inspect.signature(getattr(mod, hook)).parameters) == params, hook
    # Models never import config helpers.
    source = pathlib.Path(mod.__file__).read_text()
    assert "config_lib" not in source and "recipes" not in source


@pytest.mark.parametrize(
    "method,config_name", [(m, c) for m in METHODS for c in CONFIGS[m]], ids=lambda x: x
)
def test_method_builds_from_its_configs_and_its_loss_runs(method, config_name, tmp_path):
    c = load_config(config_name)
    assert c.model.name == method
    num_classes = recipes.DATASETS["demo" if c.data.demo else c.data.name].num_classes
    fake_assets(c, num_classes, tmp_path)
    model = nnx.eval_shape(lambda: models.create(c, num_classes=num_classes, rngs=nnx.Rngs(0)))
    images = jax.ShapeDtypeStruct((2, c.image_size, c.image_size, 3), np.float32)
    out = nnx.eval_shape(lambda m, x: m(x), model, images)
    assert out["logits"].shape == (2, num_classes)
    # The loss on concrete synthetic outputs and a batch of the pipeline's keys.
    rng = np.random.default_rng(0)
    outputs = {
        k: rng.uniform(0.1, 0.9, v.shape).astype(v.dtype)
        if k in ("scene_probs",)
        else rng.normal(size=v.shape).astype(v.dtype)
        for k, v in out.items()
    }
    batch = {
        "labels": (rng.random((2, num_classes)) < 0.3).astype(np.float32),
        "index": np.arange(2, dtype=np.int32),
        # What the single-positive methods' own steps add: the observed single positives and
        # the batch's rows of a label estimator.
        "observed": np.eye(num_classes, dtype=np.float32)[[0, 1]],
        "label_logits": rng.normal(size=(2, num_classes)).astype(np.float32),
    }
    mod = models.method_module(method)
    loss, aux = jax.jit(lambda o, b: mod.loss_fn(o, b, c))(outputs, batch)
    assert loss.shape == () and np.isfinite(float(loss))
    assert all(np.shape(v) == () and np.isfinite(float(v)) for v in aux.values())


def test_unknown_field_and_module_are_config_errors():
    with pytest.raises(ConfigError) as e:
        models.build(
            {"name": "baseline", "widths": (8,)}, num_classes=2, image_size=32, rngs=nnx.Rngs(0)
        )
    assert str(e.value) == (
        "config.model: unknown baseline field(s) widths; valid fields: backbone, "
        "backbone_kwargs, frozen_bn"
    )
    with pytest.raises(ConfigError, match=r"config.model.name='nope': no module mlgraph/models/"):
        models.method_module("nope")
    with pytest.raises(
        ConfigError,
        match=r"'graph': mlgraph/models/graph.py is not a method module \(it lacks Model",
    ):
        models.method_module("graph")
    with pytest.raises(ConfigError, match="config.loss: unknown field"):
        recipes.loss_config("asl", gama_neg=1.0)


# ------------------------------------------------------------------------------- toy method
@pytest.fixture
def data_dir(tiny_coco_dir):
    assert TINY_COCO_TRAIN == 32  # 2 steps of 16 an epoch
    return tiny_coco_dir


def _toy_config(data_dir, **changes):
    c = tiny_config(data_dir, total_steps=8)
    c.model = recipes.model_config(
        "toy.method", backbone="simple_cnn", backbone_kwargs={"widths": (8, 16)}
    )
    c.optimizer.lr = 1e-2
    c.eval_every_steps = 4
    c.update(changes)
    return c


def test_toy_method_stops_and_resumes_bit_identically(data_dir, tmp_path):
    config = _toy_config(data_dir)
    train.run(config, tmp_path / "once")
    # Stopped after step 5 (past the epoch hooks at steps 2 and 4, before the one at 6),
    # then resumed: the hook state, the per-example counts and the two optimizers come back.
    train.run(_toy_config(data_dir, stop_at_step=5), tmp_path / "twice")
    train.run(config, tmp_path / "twice")
    once, once_lines = final_run(tmp_path / "once")
    twice, twice_lines = final_run(tmp_path / "twice")
    jax.tree.map(np.testing.assert_array_equal, once, twice)
    last = lambda lines: [x for x in lines if x["step"] == 8]  # noqa: E731
    assert last(once_lines) == last(twice_lines)

    extra = once["extra"]
    assert int(extra["epochs"]) == 8 * 16 // 32 == 4
    # Every draw of an example was counted at its index: 8 steps of 16 = 4 epochs of 32.
    np.testing.assert_array_equal(extra["seen"], np.full((32, 1), 4))
    assert extra["pseudo"].shape == (32, 4) and 0 < extra["pseudo"].min()
    # Each group's Adam counted its own updates: one per step.
    for group in ("head", "backbone"):
        counts = [
            int(v)
            for path, v in jax.tree_util.tree_leaves_with_path(once["opt"][group])
            if "count" in jax.tree_util.keystr(path)
        ]
        assert counts == [8], group


def test_checkpoints_at_checkpoint_every_steps_without_evaluation(data_dir, tmp_path, monkeypatch):
    saved = []
    save = checkpointing.TrainCheckpoints.save

    def recording_save(self, step, state, data_iterator, metrics=None):
        save(self, step, state, data_iterator, metrics)
        saved.append((step, metrics is not None, step in self.all_steps()))

    monkeypatch.setattr(checkpointing.TrainCheckpoints, "save", recording_save)
    config = tiny_config(data_dir, total_steps=7)
    config.eval_every_steps = 5
    config.checkpoint_every_steps = 2
    train.run(config, tmp_path / "w")
    # Steps 2, 4 and 6 without evaluation, 5 and 7 (the end) with; each on disk when saved.
    assert saved == [
        (2, False, True),
        (4, False, True),
        (5, True, True),
        (6, False, True),
        (7, True, True),
    ]
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").open()]
    evals = [x["step"] for x in lines if "eval/mAP" in x]
    assert evals == [5, 7]
    assert 2 not in evals and 4 not in evals
    # Kept: the latest two (config.keep_checkpoints) and the best evaluated step.
    ckpts = checkpointing.TrainCheckpoints(tmp_path / "w" / "checkpoints")
    assert set(ckpts.all_steps()) == {6, 7, ckpts.best_step()} and ckpts.best_step() in (5, 7)
    ckpts.close()


def test_pipeline_yields_each_examples_index(data_dir):
    from mlgraph.data import datasets, pipeline

    config = tiny_config(data_dir)
    dataset = datasets.open_dataset(config.data)
    source = dataset.sources["train"]
    it = iter(pipeline.train_dataset(source, config, dataset.num_classes))
    for _ in range(2):  # each epoch (2 batches) holds every position once
        indices = np.concatenate([next(it)["index"] for _ in range(2)])
        assert sorted(indices.tolist()) == list(range(32))
    batch = next(iter(pipeline.train_dataset(source, config, dataset.num_classes)))
    for i, labels in zip(batch["index"], batch["labels"], strict=True):
        np.testing.assert_array_equal(labels, np.asarray(source[int(i)]["labels"], np.float32))

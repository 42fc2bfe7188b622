"""The method protocol (`mlgraph.models`): every method module defines what it must, builds
from its demo and paper configs, and its loss runs; its `Loss` declares every `config.loss`
field its code reads, and a field it lacks is a ConfigError (`models.loss_settings`); a toy
method using every optional part (two optimizers, its own step, per-example state, an epoch
hook) trains, stops, resumes and ends bit-identical to an uninterrupted run; checkpoints at
`checkpoint_every_steps`."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import pkgutil
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from train_helpers import (
    REPO,
    TINY_COCO_TRAIN,
    fake_assets,
    final_run,
    load_config,
    num_classes_of,
    tiny_config,
)

import mlgraph.models
from mlgraph import checkpointing, losses, models, recipes, train
from mlgraph.errors import ConfigError

# Modules of mlgraph/models that hold shared parts, not methods.
SHARED = {"attention", "backbones", "cam", "common", "device_augment", "graph", "layers"}
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


def synthetic_model_outputs(c, num_classes: int, tmp_path) -> tuple[dict, dict]:
    """(concrete random outputs of the model `c` describes, a batch of the pipeline's keys and
    what the single-positive methods' own steps add: the observed single positives and the
    batch's rows of a label estimator), for running its loss on 2 images."""
    fake_assets(c, num_classes, tmp_path)
    model = nnx.eval_shape(lambda: models.create(c, num_classes=num_classes, rngs=nnx.Rngs(0)))
    images = jax.ShapeDtypeStruct((2, c.image_size, c.image_size, 3), np.float32)
    out = dict(nnx.eval_shape(lambda m, x: m(x), model, images))
    rng = np.random.default_rng(0)
    outputs = {
        k: rng.uniform(0.1, 0.9, v.shape).astype(v.dtype)
        if k == "scene_probs"
        else rng.normal(size=v.shape).astype(v.dtype)
        for k, v in out.items()
    }
    batch = {
        "labels": (rng.random((2, num_classes)) < 0.3).astype(np.float32),
        "index": np.arange(2, dtype=np.int32),
        "observed": np.eye(num_classes, dtype=np.float32)[[0, 1]],
        "label_logits": rng.normal(size=(2, num_classes)).astype(np.float32),
    }
    return outputs, batch


@pytest.mark.parametrize(
    "method,config_name", [(m, c) for m in METHODS for c in CONFIGS[m]], ids=lambda x: x
)
def test_method_builds_from_its_configs_and_its_loss_runs(method, config_name, tmp_path):
    c = load_config(config_name)
    assert c.model.name == method
    num_classes = num_classes_of(c)
    outputs, batch = synthetic_model_outputs(c, num_classes, tmp_path)
    assert outputs["logits"].shape == (2, num_classes)
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
        recipes.loss_config("salgl", gama_neg=1.0)


# ---------------------------------------------------------------------------------- config.loss
# Each method's loss names, every one of which its loss_fn must run with the defaults alone.
LOSS_NAMES = {
    "baseline": losses.LOSSES,
    "salgl": losses.LOSSES,
    "ssgrl": losses.LOSSES,
    "mlgcn": losses.LOSSES,
    "q2l": losses.LOSSES,
    "spml": losses.SPML_LOSSES,
    "scob": ("scob",),
    "sigrl": ("sigrl", "em"),
}
DEFAULT_LOSS_NAME = {
    "baseline": "bce",
    "salgl": "asl",
    "ssgrl": "bce",
    "mlgcn": "bce",
    "q2l": "asl",
    "spml": "an",
    "scob": "scob",
    "sigrl": "sigrl",
}


def test_every_method_declares_its_loss():
    assert sorted(LOSS_NAMES) == sorted(DEFAULT_LOSS_NAME) == METHODS
    for name in METHODS:
        cls = models.method_module(name).Loss
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        defaults = models.loss_defaults(name)
        assert defaults["name"] == DEFAULT_LOSS_NAME[name], name
        assert defaults == dataclasses.asdict(cls()), name
        # Every field survives config.json.
        assert json.loads(json.dumps(defaults)) == json.loads(
            models.loss_config(name).to_json_best_effort()
        )
    classification = ("name", "gamma_pos", "gamma_neg", "clip", "eps")
    assert tuple(models.loss_defaults("ssgrl")) == classification
    assert tuple(models.loss_defaults("salgl")) == (*classification, "lamda")
    assert models.loss_defaults("sigrl") == dataclasses.asdict(losses.SinglePositiveLoss()) | {
        "name": "sigrl",
        "rank_weight": 1.0,
        "distill_weight": 1.0,
    }
    assert models.loss_defaults("scob") == {
        "name": "scob",
        "expected_num_pos": 1.5,
        "cl_weight": 0.1,
        "cl_temperature": 1.0,
        "hard_correlation": True,
        "exclude_own_prototype": False,
    }
    # A method without `Loss` (the toy) has the classification loss's fields.
    assert models.loss_defaults("toy.method") == dataclasses.asdict(losses.ClassificationLoss())


def test_misspelt_loss_field_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        recipes.loss_config("salgl", gama_neg=1.0)
    assert str(e.value) == (
        "config.loss: unknown field(s) gama_neg of salgl's loss; valid fields: clip, eps, "
        "gamma_neg, gamma_pos, lamda, name"
    )
    with pytest.raises(ConfigError) as e:
        models.loss_config("scob", alpha=0.1, cl_wieght=1.0)
    assert str(e.value) == (
        "config.loss: unknown field(s) alpha, cl_wieght of scob's loss; valid fields: "
        "cl_temperature, cl_weight, exclude_own_prototype, expected_num_pos, "
        "hard_correlation, name"
    )
    c = recipes.loss_config("spml", name="role", expected_num_pos=2.9)
    assert (c.name, c.expected_num_pos, c.alpha) == ("role", 2.9, 0.2)


def test_loss_settings_fill_missing_fields_and_refuse_foreign_ones():
    # An older config without `lamda`: the method's default fills it in.
    c = ml_collections.ConfigDict({"model": {"name": "salgl"}, "loss": {"gamma_neg": 4.0}})
    assert models.loss_settings(c).to_dict() == {
        "name": "asl",
        "gamma_pos": 0.0,
        "gamma_neg": 4.0,
        "clip": 0.0,
        "eps": 1e-5,
        "lamda": 1.0,
    }
    assert c.loss.to_dict() == {"gamma_neg": 4.0}  # the config itself is not modified
    # An empty (or absent) config.loss is the method's defaults.
    c = ml_collections.ConfigDict({"model": {"name": "scob"}, "loss": {}})
    assert models.loss_settings(c).to_dict() == models.loss_defaults("scob")
    c = ml_collections.ConfigDict({"model": {"name": "q2l"}})
    assert models.loss_settings(c).to_dict() == models.loss_defaults("q2l")
    # SALGL's lamda on SSGRL was accepted and ignored; now it is refused.
    c = load_config("ssgrl_demo")
    c.loss.lamda = 2.0
    with pytest.raises(ConfigError) as e:
        models.loss_settings(c)
    assert str(e.value) == (
        "config.loss: unknown field(s) lamda of ssgrl's loss; valid fields: clip, eps, "
        "gamma_neg, gamma_pos, name"
    )
    with pytest.raises(ConfigError, match="config.model.name: missing"):
        models.loss_settings(ml_collections.ConfigDict({"loss": {}}))


def test_training_refuses_a_loss_field_the_method_lacks(tmp_path):
    c = tiny_config(tmp_path / "no_data")
    c.loss.alpha = 0.2  # an SPML field on the baseline
    with pytest.raises(ConfigError, match=r"^config.loss: unknown field\(s\) alpha of baseline"):
        train.run(c, tmp_path / "w")


@pytest.mark.parametrize("method", METHODS)
def test_loss_fn_runs_on_the_loss_defaults_alone(method, tmp_path):
    """Every `config.loss` field the method's loss reads, for each of its loss names, is a
    field of its `Loss`: the loss runs on `loss_settings` of a config.loss naming the loss
    and nothing else."""
    c = load_config(CONFIGS[method][0])
    num_classes = num_classes_of(c)
    outputs, batch = synthetic_model_outputs(c, num_classes, tmp_path)
    if "global" in outputs:  # SigRL's distillation term reads its weight only with a teacher
        outputs.setdefault("teacher", outputs["global"])
    mod = models.method_module(method)
    for name in LOSS_NAMES[method]:
        config = ml_collections.ConfigDict({"model": c.model.to_dict(), "loss": {}})
        config.loss = models.loss_settings(config)
        config.loss.name = name
        config.loss.lock()  # a field the defaults lack is an AttributeError, not a new field
        loss, aux = mod.loss_fn(outputs, batch, config)
        assert np.shape(loss) == () and np.isfinite(float(loss)), name
        assert all(np.isfinite(float(v)) for v in aux.values()), name


CLASSIFICATION = ("baseline", "salgl", "ssgrl", "mlgcn", "q2l")  # `losses.classification`
# Where `config.loss` is read outside `loss_fn` (hooks, optimizers, train steps, the SPML and
# classification losses, the torch references): each field read there must be one of the
# fields of the methods that run that code.
LOSS_READS = {
    **{f"mlgraph/models/{m}.py": (r"(?:\bconfig\.loss|\bcfg)\.(\w+)", (m,)) for m in METHODS},
    "mlgraph/losses.py:classification": (r"\bloss_cfg\.(\w+)", CLASSIFICATION),
    "mlgraph/losses.py:spml": (r"\bcfg\.(\w+)", ("spml", "sigrl")),
    "mlgraph/torch_reference/losses.py": (r"\bloss_cfg\.(\w+)", CLASSIFICATION),
    "mlgraph/torch_reference/salgl.py": (r"\bloss_cfg\.(\w+)", ("salgl",)),
}


@pytest.mark.parametrize("where", sorted(LOSS_READS))
def test_every_loss_field_read_is_declared(where):
    pattern, methods = LOSS_READS[where]
    source = (REPO / where.partition(":")[0]).read_text()
    read = set(re.findall(pattern, source))
    assert read, f"{where}: no config.loss reads found (the pattern is out of date)"
    for method in methods:
        missing = read - set(models.loss_defaults(method))
        assert not missing, f"{where} reads config.loss.{missing} that {method}'s Loss lacks"


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


# slow (35 s): stopping and resuming bit for bit is in CI through test_train's
# test_resume_is_exact, test_reliability's SIGTERM test and test_spml's EM+APL resume.
@pytest.mark.slow
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

"""The one training loop: mesh, data, model, optimizer, restore, steps, eval, loop.

Data parallel `jax.jit` over a ('data',) mesh: the train state is replicated, each batch is
sharded on its leading axis, so gradients, batch-norm statistics and method buffers (SALGL's
co-occurrence counts) are reduced over the global batch by construction.

The model is an NNX module used functionally: `nnx.split` once into (graphdef, params, rest),
`nnx.merge` inside the jitted steps. `params` are the `nnx.Param`s (optimized); `rest` holds batch
statistics and buffers, updated by the forward pass in training mode.

A run holds its workdir's lock (`workdir_lock`), stops cleanly with a checkpoint on SIGTERM or
SIGINT (`preemption`), resumes from the newest readable checkpoint (`checkpointing`), and
never saves a state past a non-finite step (`divergence`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from mlgraph import (
    assets,
    checkpointing,
    config_lib,
    divergence,
    init_from,
    metrics,
    models,
    optim,
    paths,
    preemption,
    sharding,
    workdir_lock,
)
from mlgraph.data import datasets, pipeline
from mlgraph.errors import ConfigError, WorkdirError
from mlgraph.metric_writer import MetricWriter, read_metrics

# Fields that may change between a run and its resumption without changing what is computed
# (skip_nonfinite: a run stopped by a non-finite step may resume skipping such steps).
RESUMABLE_CHANGES = (
    "stop_at_step",
    "data.worker_count",
    "data.prefetch",
    "log_every_steps",
    "keep_checkpoints",
    "optimizer.skip_nonfinite",
)


# ---------------------------------------------------------------------------------------------
# Workdir
# ---------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def create_workdir(workdir: str | pathlib.Path) -> epath.Path:
    """`workdir` as an absolute path (local) or as given (cloud), created if needed (a local
    parent folder must exist; object stores have no folders to check).

    Raises:
      StorageError: a cloud workdir without its storage backend installed.
      WorkdirError: the parent of a local workdir, or the bucket of a cloud one, does not
        exist.
    """
    workdir = paths.path(workdir, "--workdir")
    if not paths.is_cloud(workdir) and not workdir.parent.is_dir():
        raise WorkdirError(f"--workdir {workdir}: parent folder {workdir.parent} does not exist")
    try:
        workdir.mkdir(exist_ok=True)  # in a bucket: a no-op that checks the bucket exists
    except FileNotFoundError:
        if not paths.is_cloud(workdir):
            raise
        bucket = paths.bucket(workdir)
        raise WorkdirError(
            f"--workdir {workdir}: bucket {bucket} does not exist (or these credentials cannot "
            f"see it); create it with gcloud storage buckets create {bucket}"
        ) from None
    return workdir


def prepare_workdir(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> epath.Path:
    """Create `workdir` (its parent must exist) and record the config, or check it on resume."""
    workdir = create_workdir(workdir)
    config_file = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if config_file.exists():
        previous = json.loads(config_file.read_text())
        a, b = _flatten(previous), _flatten(current)
        changed = sorted(
            k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
        )
        if changed:
            raise WorkdirError(
                f"--workdir {workdir}: holds a run of a different config (fields "
                f"{', '.join(changed)} differ); use a new workdir"
            )
    if jax.process_index() == 0:
        config_file.write_text(json.dumps(current, indent=2, sort_keys=True))
    return workdir


# ---------------------------------------------------------------------------------------------
# Model and state
# ---------------------------------------------------------------------------------------------
def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    num_train_examples: int | None = None,
    earlier_run: dict | None = None,
):
    """(the method's module, graphdef, params, rest) for `config`, from `config.init_from` if
    set (`earlier_run`: that training workdir's state, when the caller has read it already).

    Initialisation runs under one `jax.jit`: eagerly, every new weight shape is its own
    compilation, which takes minutes for a ResNet-101 on a CPU host.
    """
    mod = models.method_module(config.model.name)
    if config.init_from and not init_from.is_workdir(config.init_from):
        # A weights checkpoint for another architecture is refused before the model is built
        # (minutes for a ResNet-101 on a CPU host).
        settings = checkpointing.load_weights_settings(config.init_from)
        if settings.get("kind", "model") == "model":
            init_from.check_weights_settings(settings, config.model, config.init_from)

    def create():
        return models.create(
            config,
            num_classes=num_classes,
            rngs=nnx.Rngs(config.seed),
            num_train_examples=num_train_examples,
        )

    graphdef, _, _ = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    params, rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[1:])()
    if config.init_from and init_from.is_workdir(config.init_from):
        saved = earlier_run or init_from.read_workdir_state(config.init_from, config.model)
        params = init_from.fill_from(params, saved["params"], f"{config.init_from} params")
        rest = init_from.fill_from(rest, saved["rest"], f"{config.init_from} state")
    elif config.init_from:
        model = nnx.merge(graphdef, params, rest)
        init_from.init_from_weights(model, config.init_from)
        _, params, rest = nnx.split(model, nnx.Param, ...)
    return mod, graphdef, params, rest


def make_optimizer(mod, config: ml_collections.ConfigDict, total: int, params):
    """The method's optimizer (`make_optimizer` of its module) or `optim.make_optimizer` of
    `config.optimizer`."""
    if hasattr(mod, "make_optimizer"):
        return mod.make_optimizer(config, total, params)
    return optim.make_optimizer(config.optimizer, total, params)


def init_train_state(
    config: ml_collections.ConfigDict,
    num_classes: int,
    total: int,
    training: datasets.TrainingSplit | None = None,
):
    """(method module, graphdef, optimizer, train state) for a fresh run on `training` (the
    training examples; needed by methods with per-example state).

    The state is a dict: `params` (nnx.Param), `rest` (batch statistics, buffers), `opt` (the
    optimizer's state), `ema` (params and rest of the EMA model), `step`, `extra` (the
    method's own arrays from `init_extra`, e.g. per-example label matrices; {} if none) and
    `health` (the loop's finite check, `mlgraph.divergence`; a method's step never sees it).
    """
    num_train = None if training is None else training.num_examples
    # A training workdir as `init_from` is read once, for the weights and the method's state.
    earlier_run = None
    if config.init_from and init_from.is_workdir(config.init_from):
        earlier_run = init_from.read_workdir_state(config.init_from, config.model)
    mod, graphdef, params, rest = create_model(config, num_classes, num_train, earlier_run)
    tx = make_optimizer(mod, config, total, params)
    extra = {}
    if hasattr(mod, "init_extra"):
        if training is None:
            raise ValueError(f"{config.model.name}: init_extra needs the training split")
        extra = mod.init_extra(config, training)
        if earlier_run is not None:
            extra = init_from.carry_extra(extra, earlier_run["extra"])
    state = {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        # A copy: the EMA must not share buffers with the live weights, which are donated.
        "ema": jax.tree.map(jnp.copy, {"params": params, "rest": rest}),
        "step": jnp.zeros((), jnp.int32),
        "extra": jax.tree.map(jnp.asarray, extra),
        divergence.HEALTH: divergence.initial_health(),
    }
    return mod, graphdef, tx, state


def ema_update(ema: Any, live: Any, decay: float, live_paths: tuple[str, ...]) -> Any:
    """ema <- decay * ema + (1 - decay) * live; entries matching `live_paths` are copied live."""
    patterns = [re.compile(p) for p in live_paths]

    def update(path, e, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if any(p.fullmatch(name) for p in patterns) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return decay * e + (1.0 - decay) * x

    return jax.tree_util.tree_map_with_path(update, ema, live)


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a train step is made from (the argument of a method's `make_train_step`).

    Attributes:
      mod: the method module (its `loss_fn`).
      graphdef: the model's graph definition (`nnx.merge(graphdef, params, rest)`).
      tx: the optimizer (`optim.make_optimizer`, or the method's `make_optimizer`).
      config: the run's config.
      total_steps: the length of the run.
      ema_live: state paths the EMA takes live (the config's and the method's).
    """

    mod: Any
    graphdef: nnx.GraphDef
    tx: Any
    config: ml_collections.ConfigDict
    total_steps: int
    ema_live: tuple[str, ...]

    def loss_and_grads(
        self, params: Any, rest: Any, batch: dict, step: jax.Array, trainable: dict | None = None
    ):
        """The method's loss on `batch` and its gradient with respect to `params`.

        Forward in training mode (batch statistics and method buffers such as SALGL's
        co-occurrence counts update over the global batch), dropout keyed by `step`.
        `trainable`: further arrays outside the model that `loss_fn` reads as batch entries and
        that are differentiated too (e.g. the rows of ROLE's label matrix).

        Only the parameters `config.optimizer.frozen` does not match are differentiated: the
        frozen ones get zero gradients without a backward pass through them (a frozen backbone
        costs its forward only), which the optimizer then ignores as before.

        Returns:
          (loss, aux metrics, the updated non-parameter state `rest`, grads): grads of `params`,
          or the pair (grads of `params`, grads of `trainable`) when `trainable` is given.
        """
        dropout_key = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
        frozen, params = optim.split_frozen(params, self.config.optimizer)

        def loss_of(params, extra_inputs, rest):
            # `rest` is copied so that the forward's buffer updates belong to this trace.
            model = nnx.merge(self.graphdef, params, frozen, jax.tree.map(lambda x: x, rest))
            rngs = nnx.Rngs(dropout=dropout_key)
            out = model(batch["image"], labels=batch["labels"], train=True, rngs=rngs)
            with jax.named_scope("loss"):  # the parts of `mlgraph.bench --profile`'s table
                loss, aux = self.mod.loss_fn(out, batch | extra_inputs, self.config)
            return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)
        (loss, (aux, rest)), (grads, extra_grads) = grad_fn(params, trainable or {}, rest)
        grads = nnx.merge_state(grads, jax.tree.map(jnp.zeros_like, frozen))
        return loss, aux, rest, (grads, extra_grads) if trainable is not None else grads

    def finish(self, state: dict, params: Any, rest: Any, opt: Any, **changes) -> dict:
        """The next state: new params, rest and optimizer state, the EMA updated from them,
        the step counted; `changes` replace other entries (e.g. `extra`)."""
        with jax.named_scope("ema"):
            ema = ema_update(
                state["ema"], {"params": params, "rest": rest}, self.config.ema.decay, self.ema_live
            )
        new = dict(state, params=params, rest=rest, opt=opt, ema=ema, step=state["step"] + 1)
        return new | changes


def default_train_step(ctx: StepContext):
    """The (un-jitted) step: (state, batch) -> (new state, scalar metrics): the method's loss
    and its gradient, one optax update, the EMA of every state entry."""
    lr_fn = optim.learning_rate_fn(ctx.config.optimizer, ctx.total_steps)

    def train_step(state, batch):
        loss, aux, rest, grads = ctx.loss_and_grads(
            state["params"], state["rest"], batch, state["step"]
        )
        with jax.named_scope("optimizer"):
            updates, opt = ctx.tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        return ctx.finish(state, params, rest, opt), {
            "loss": loss,
            "lr": lr_fn(state["step"]),
            **aux,
        }

    return train_step


def make_train_step(mod, graphdef: nnx.GraphDef, tx, config: ml_collections.ConfigDict, total: int):
    """The method's train step (`make_train_step` of its module) or `default_train_step`, inside
    the finite check of `divergence.guard_step` (so every method's steps are checked)."""
    # State the EMA model takes live instead of averaging: the config's, plus the method's own
    # (e.g. SALGL's co-occurrence counts when comat_ema is off).
    method_live = getattr(mod, "ema_live_paths", lambda config: ())(config)
    ctx = StepContext(
        mod=mod,
        graphdef=graphdef,
        tx=tx,
        config=config,
        total_steps=total,
        ema_live=tuple(config.ema.live) + tuple(method_live),
    )
    train_step = getattr(mod, "make_train_step", default_train_step)(ctx)
    return divergence.guard_step(train_step, config.optimizer.skip_nonfinite)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def make_predict(graphdef: nnx.GraphDef, pairs_of, **call_kwargs) -> Any:
    """A function (state, images) -> tuple of sigmoid scores, one per (params, rest) pair that
    `pairs_of(state)` picks from the state (e.g. the model and its EMA); `call_kwargs` go to
    the model's call (e.g. SigRL's queried `label_ids`)."""

    def predict(state, images):
        out = []
        for params, rest in pairs_of(state):
            model = nnx.merge(graphdef, params, rest)
            logits = model(images, train=False, **call_kwargs)["logits"]
            out.append(jax.nn.sigmoid(logits.astype(jnp.float32)))
        return tuple(out)

    return predict


@dataclasses.dataclass(frozen=True)
class EvalView:
    """A label set that evaluation scores with a forward pass of its own (a method's
    `eval_views`: SigRL's ZSL over the unseen classes, GZSL over all of them).

    Attributes:
      name: the metric prefix (`eval/<name>_<metric>`).
      ids: class positions, or None for every class (the loop's own scores are reused).
      predict: the jitted predict over `ids` (None with `ids` None).
    """

    name: str
    ids: np.ndarray | None
    predict: Any


def eval_views(mod, config, state, graphdef, pairs_of, **jit_kwargs) -> list[EvalView]:
    """The method's evaluation views (`eval_views(config, extra)` of its module; none if it
    has no such function), each with its jitted predict."""
    views = getattr(mod, "eval_views", lambda c, e: {})(config, state["extra"])
    out = []
    for name, ids in views.items():
        fn = None
        if ids is not None:
            ids = np.asarray(ids)
            fn = jax.jit(make_predict(graphdef, pairs_of, label_ids=jnp.asarray(ids)), **jit_kwargs)
        out.append(EvalView(name, ids, fn))
    return out


def view_metrics(
    mod, views: list[EvalView], result: dict, state, source, config, num_classes, mesh, prefixes
) -> dict[str, float]:
    """`<prefix><view>_<metric>` of each view by the method's `view_metrics(scores, labels,
    mask)`; `result` is `evaluate_scores`' over every class (the views with `ids` None)."""
    out = {}
    for view in views:
        labels, mask = result["labels"], result["label_mask"]
        scores = result["scores"]
        if view.ids is not None:
            scores = evaluate_scores(view.predict, state, source, config, num_classes, mesh)
            scores = scores["scores"]
            labels, mask = labels[:, view.ids], mask[:, view.ids]
        scores = (list(scores) * 2)[: len(prefixes)]  # the EMA's, when not scored
        for prefix, s in zip(prefixes, scores, strict=True):
            for name, value in mod.view_metrics(s, labels, mask).items():
                out[f"{prefix}{view.name}_{name}"] = value
    return out


def model_and_ema(state) -> tuple:
    """The (params, rest) pairs of the live model and of its EMA."""
    return ((state["params"], state["rest"]), (state["ema"]["params"], state["ema"]["rest"]))


def evaluate_scores(predict, state, source, config, num_classes, mesh) -> dict[str, np.ndarray]:
    """Scores of each model `predict` returns over every example of `source` (padding masked).

    Returns {"scores": [model_0 scores, model_1 scores, ...], "labels": [N, C]}.
    """
    scores, labels, label_masks = [], [], []
    for local in pipeline.eval_batches(source, config, num_classes):
        batch = sharding.global_batch(mesh, local)
        outputs = predict(state, batch["image"])
        mask = sharding.to_host(batch["mask"])
        scores.append([sharding.to_host(s)[mask] for s in outputs])
        labels.append(sharding.to_host(batch["labels"])[mask])
        label_masks.append(sharding.to_host(batch["label_mask"])[mask])
    return {
        "scores": [np.concatenate(per_model) for per_model in zip(*scores, strict=True)],
        "labels": np.concatenate(labels),
        "label_mask": np.concatenate(label_masks),
    }


def eval_metrics(result: dict, prefixes=("eval/", "eval/ema_")) -> dict[str, float]:
    """`eval/<metric>` for the model and `eval/ema_<metric>` for the EMA (or the `prefixes`
    given), in percent, and the number of images scored."""
    out = {f"{prefixes[0]}images": float(len(result["labels"]))}
    mask = result.get("label_mask")
    for prefix, scores in zip(prefixes, result["scores"], strict=True):
        for name, value in metrics.compute_all(scores, result["labels"] > 0.5, mask).items():
            out[prefix + name] = value
    return out


def check_best_metric(config: ml_collections.ConfigDict, eval_sets: dict) -> None:
    """`config.best_metric` must name a metric an evaluation logs.

    Raises:
      ConfigError: another prefix (or 'val/' without a held-out split) or metric name.
    """
    prefix, _, name = config.best_metric.rpartition("/")
    names = set(metrics.metric_names())
    mod = models.method_module(config.model.name)
    if hasattr(mod, "view_metric_names"):
        names |= set(mod.view_metric_names())
    names |= {f"ema_{n}" for n in names}
    if f"{prefix}/" not in eval_sets or name not in names:
        raise ConfigError(
            f"config.best_metric={config.best_metric!r}: expected one of "
            f"{', '.join(p + 'ema_mAP' for p in eval_sets)} or another logged metric "
            f"({', '.join(sorted(names))}) under {' or '.join(eval_sets)}"
            + ("" if "val/" in eval_sets else "; 'val/' needs config.data.val_fraction > 0")
        )


# ---------------------------------------------------------------------------------------------
# Epoch hooks
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a method's `epoch_end(ctx, state, epoch)` host hook can use.

    Attributes:
      config: the run's config.
      mesh: the device mesh (`sharding.global_batch(mesh, ...)` for device inputs).
      train_source: the training split (random access; position = `batch["index"]`).
      num_classes: C.
      graphdef: the model's graph definition.
    """

    config: ml_collections.ConfigDict
    mesh: Any
    train_source: Any
    num_classes: int
    graphdef: nnx.GraphDef
    predict: Any  # jitted (state, images) -> (live model scores,)

    def score(self, state: dict, source: Any = None) -> np.ndarray:
        """Sigmoid scores [N, C] of the live model on every example of `source` (default: the
        training split) through the evaluation transform, in the source's order."""
        source = self.train_source if source is None else source
        result = evaluate_scores(
            self.predict, state, source, self.config, self.num_classes, self.mesh
        )
        return result["scores"][0]


def epochs_done(step: int, batch_size: int, num_examples: int) -> int:
    """How many passes over `num_examples` the first `step` batches of `batch_size` finish."""
    return step * batch_size // num_examples


def log(message: str) -> None:
    """Print `message` on process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`; returns the last evaluation's metrics.

    The run holds the workdir's lock throughout, and SIGTERM or SIGINT stops it after the
    current step with a checkpoint (a second one exits at once).

    Raises:
      WorkdirError: another run holds the workdir, or it holds another config's run.
      DivergenceError: a non-finite step (without `config.optimizer.skip_nonfinite`).
    """
    workdir = create_workdir(workdir)
    with (
        workdir_lock.hold(workdir) as lock,
        preemption.StopSignals(on_exit=lock.release) as signals,
    ):
        return _run(config, workdir, signals)


def _run(config, workdir: epath.Path, signals: preemption.StopSignals) -> dict[str, float]:
    # The method's complete loss settings (its `Loss` defaults, then config.loss), on a copy:
    # a field the method does not have fails here, and config.json records what trains.
    config = config.copy_and_resolve_references()
    config.loss = models.loss_settings(config)
    # --- workdir -------------------------------------------------------------------------
    workdir = prepare_workdir(workdir, config)
    if config.keep_checkpoints < 1:
        raise ConfigError(
            f"config.keep_checkpoints={config.keep_checkpoints}: expected at least 1 (the "
            "newest steps kept besides the best)"
        )

    # --- mesh ----------------------------------------------------------------------------
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size)
    sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    # --- data ----------------------------------------------------------------------------
    dataset = datasets.open_dataset(config.data)
    training = datasets.training_split(dataset, config.data)
    train_source = training.source
    eval_source = dataset.sources[config.data.eval_split]
    # Each evaluation scores these (metric prefix -> source); 'val/' selects models when set.
    eval_sets = {"eval/": eval_source}
    if training.holdout is not None:
        eval_sets["val/"] = training.holdout
    check_best_metric(config, eval_sets)
    num_classes, num_train = dataset.num_classes, len(train_source)
    total = config_lib.total_steps(config, num_train)
    config = assets.resolve(config, dataset.class_names, dataset.directory)
    batches = sharding.DeviceBatches(
        iter(pipeline.train_dataset(train_source, config, num_classes)), mesh
    )

    # --- model, optimizer, EMA -----------------------------------------------------------
    mod, graphdef, tx, state = init_train_state(config, num_classes, total, training)
    state = jax.device_put(state, repl)
    state_sh = jax.tree.map(lambda _: repl, state)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    num_trainable = optim.trainable_size(state["params"], config.optimizer)

    # --- restore -------------------------------------------------------------------------
    ckpts = checkpointing.TrainCheckpoints(
        workdir / "checkpoints", keep=config.keep_checkpoints, repair=True
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    # The newest readable checkpoint (newer unreadable ones are reported and set aside).
    # `health` is the fresh one for checkpoints written before it existed.
    health = {divergence.HEALTH: state[divergence.HEALTH]}
    start, restored = ckpts.restore_latest(abstract, batches, defaults=health)
    if start is not None:
        state = restored
        logging.info("resumed %s at step %d", workdir, start)
    step = int(start or 0)
    logged = [r for r in read_metrics(workdir) if r["step"] <= step]
    stopped_early = any(r.get("early_stop") for r in logged)
    if step >= total or stopped_early:
        history = [r for r in logged if "eval/ema_mAP" in r]
        last = history[-1] if history else {}
        log(
            f"{workdir}: training already finished at step {step}/{total}"
            f"{' (early stop)' if stopped_early else ''} "
            f"(eval/mAP {last.get('eval/mAP', float('nan')):.2f}, "
            f"eval/ema_mAP {last.get('eval/ema_mAP', float('nan')):.2f}); nothing to do"
        )
        ckpts.close()
        return {k: v for k, v in last.items() if k != "step"}
    # Lines logged after the restored step (by a run stopped or killed since) are cut.
    writer = MetricWriter(workdir, resume_step=step)

    # --- steps ---------------------------------------------------------------------------
    p_train = jax.jit(
        make_train_step(mod, graphdef, tx, config, total),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    # With decay 0 the EMA is the model, bit for bit: score once and report it for both.
    scored = model_and_ema if config.ema.decay else (lambda st: model_and_ema(st)[:1])
    p_predict = jax.jit(
        make_predict(graphdef, scored),
        in_shardings=(state_sh, data_sh),
        out_shardings=(data_sh,) * (2 if config.ema.decay else 1),
    )
    views = eval_views(
        mod, config, state, graphdef, scored,
        in_shardings=(state_sh, data_sh), out_shardings=(data_sh,) * (2 if config.ema.decay else 1),
    )  # fmt: skip
    epoch_end = getattr(mod, "epoch_end", None)
    hooks = None
    if epoch_end is not None:
        p_live = jax.jit(
            make_predict(graphdef, lambda st: ((st["params"], st["rest"]),)),
            in_shardings=(state_sh, data_sh),
            out_shardings=(data_sh,),
        )
        hooks = HookContext(config, mesh, train_source, num_classes, graphdef, p_live)

    # --- loop ----------------------------------------------------------------------------
    stop = min(total, config.stop_at_step) if config.stop_at_step else total
    log(
        f"training {config.model.name} ({num_params:,} parameters, {num_trainable:,} "
        f"trainable) on {dataset.name} "
        f"({num_train} train, {len(eval_source)} eval images, {num_classes} classes) "
        f"for {total} steps of {config.batch_size} on {jax.device_count()} device(s); "
        f"starting at step {step}"
    )
    eval_every = config.eval_every_steps
    if config.eval_every_epochs:
        eval_every = max(1, math.ceil(config.eval_every_epochs * num_train / config.batch_size))
    last_eval: dict[str, float] = {}
    best_so_far = max(
        (r[config.best_metric] for r in logged if config.best_metric in r), default=-np.inf
    )
    t0, step0 = time.time(), step
    skip_nonfinite = config.optimizer.skip_nonfinite
    stopped_by = None  # the signal that stopped the run, if one did
    try:
        while step < stop:
            state, train_metrics = p_train(state, next(batches))
            batches.prefetch()  # host input for the next step while this one runs
            step += 1
            at_log = step % config.log_every_steps == 0 or step == stop
            epoch = epochs_done(step, config.batch_size, num_train)
            at_hook = hooks is not None and epoch > epochs_done(
                step - 1, config.batch_size, num_train
            )
            at_eval = step % eval_every == 0 or step == stop
            every = config.checkpoint_every_steps
            at_save = at_eval or bool(every and step % every == 0)
            if signals.should_stop(step - step0):
                stopped_by, at_save = signals.describe(), True
            # Only where the host waits for the device anyway: no state past a non-finite
            # step is logged, hooked, evaluated or saved.
            if at_log or at_hook or at_save:
                skipped = divergence.check(state, skip_nonfinite, ckpts.latest_step())
            if at_log:
                train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
                rate = (step - step0) * config.batch_size / (time.time() - t0)
                left = (total - step) * config.batch_size / max(rate, 1e-9)
                writer.write(step, {f"train/{k}": v for k, v in train_metrics.items()})
                log(
                    f"step {step}/{total} loss {train_metrics['loss']:.4f} "
                    f"lr {train_metrics['lr']:.2e} | {rate:.1f} img/s | "
                    f"{left / 60:.1f} min left"
                    + (f" | {skipped} non-finite updates skipped" if skipped else "")
                )
            if at_hook:
                state = epoch_end(hooks, state, epoch)
            best_by = None  # the metric a checkpoint is ranked by; None: not an evaluation step
            if at_eval:
                last_eval = {}
                for prefix, source in eval_sets.items():
                    result = evaluate_scores(p_predict, state, source, config, num_classes, mesh)
                    divergence.check_scores(
                        result["scores"],
                        ["model", "EMA model"][: len(result["scores"])],
                        f"{prefix[:-1]} at step {step}",
                    )
                    result["scores"] = (result["scores"] * 2)[:2]  # the EMA's, when not scored
                    last_eval |= eval_metrics(result, (prefix, f"{prefix}ema_"))
                    log(
                        f"{prefix[:-1]} step {step}: mAP {last_eval[prefix + 'mAP']:.2f} "
                        f"EMA mAP {last_eval[prefix + 'ema_mAP']:.2f} "
                        f"(CF1 {last_eval[prefix + 'CF1']:.2f} OF1 {last_eval[prefix + 'OF1']:.2f})"
                    )
                    shown = view_metrics(
                        mod, views, result, state, source, config, num_classes, mesh,
                        (prefix, f"{prefix}ema_"),
                    )  # fmt: skip
                    last_eval |= shown
                    for view in views:
                        head = f"{prefix}{view.name}_"
                        log(
                            f"{prefix[:-1]} step {step} {view.name.upper()}: "
                            + " ".join(
                                f"{k[len(head) :]} {v:.2f}"
                                for k, v in shown.items()
                                if k.startswith(head)
                            )
                        )
                value = last_eval[config.best_metric]
                best_by = {checkpointing.BEST_METRIC: value}
                if config.early_stop and value <= best_so_far:
                    last_eval["early_stop"] = 1.0
                    log(
                        f"early stop at step {step}: {config.best_metric} {value:.2f} did not "
                        f"improve on {best_so_far:.2f}"
                    )
                best_so_far = max(best_so_far, value)
                writer.write(step, last_eval)
            if at_save:
                ckpts.save(step, state, batches, best_by)
            if stopped_by or (last_eval.get("early_stop") and best_by is not None):
                break
    finally:
        ckpts.close()
        writer.close()
        batches.close()
    if step >= total or last_eval.get("early_stop"):
        log(f"finished: {workdir} (best step by {config.best_metric}: {ckpts.best_step()})")
    elif stopped_by:
        log(
            f"{stopped_by}: stopped at step {step}/{total} with a checkpoint; run the same "
            "command to resume"
        )
    else:
        log(f"stopped at step {step}/{total}; run the same command to resume")
    return last_eval

"""The one training loop: set up, restore, train, evaluate, checkpoint.

Data parallel `jax.jit` over a ('data',) mesh: the train state is replicated, each batch is
sharded on its leading axis, so gradients, batch-norm statistics and method buffers (SALGL's
co-occurrence counts) are reduced over the global batch by construction. The state and the
step are `mlgraph.train_state` and `mlgraph.train_step`; evaluation is `mlgraph.evaluation`.

A run holds its workdir's lock (`workdir_lock`), stops cleanly with a checkpoint on SIGTERM or
SIGINT (`preemption`), resumes from the newest readable checkpoint (`checkpointing`), and
never saves a state past a non-finite step (`divergence`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from mlgraph import (
    assets,
    checkpointing,
    config_lib,
    divergence,
    evaluation,
    models,
    optim,
    paths,
    preemption,
    sharding,
    train_state,
    train_step,
    workdir_lock,
)
from mlgraph import workdir as workdirs
from mlgraph.data import datasets, pipeline
from mlgraph.metric_writer import MetricWriter, read_metrics


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a method's `epoch_end(ctx, state, epoch)` host hook can use.

    Attributes:
      config: the run's config.
      mesh: the device mesh (`sharding.global_batch(mesh, ...)` for device inputs).
      train_source: the training split (random access; position = `batch["index"]`).
      num_classes: C.
      graphdef: the model's graph definition.
      scorer: scores a split with the live model (`evaluation.Scorer`).
    """

    config: ml_collections.ConfigDict
    mesh: Any
    train_source: Any
    num_classes: int
    graphdef: nnx.GraphDef
    scorer: evaluation.Scorer

    def score(self, state: dict, source: Any = None) -> np.ndarray:
        """Sigmoid scores [N, C] of the live model on every example of `source` (default: the
        training split) through the evaluation transform, in the source's order."""
        source = self.train_source if source is None else source
        return self.scorer.scores(state, source)["scores"][0]


def epochs_done(step: int, batch_size: int, num_examples: int) -> int:
    """How many passes over `num_examples` the first `step` batches of `batch_size` finish."""
    return step * batch_size // num_examples


def log(message: str) -> None:
    """Print `message` on process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Set up
# ---------------------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with its method's complete loss settings (its `Loss` defaults, then
    `config.loss`, so that config.json records what trains), after the checks that need no
    data: the method exists, every numeric field is in its range (`config_lib.RANGES`), the
    batches split over the devices.

    Raises:
      ConfigError: a setting no run can use (the field named), or a loss field the method
        does not have.
    """
    config = config.copy_and_resolve_references()
    config.loss = models.loss_settings(config)
    config_lib.check_ranges(config)
    sharding.check_batch_size(config.batch_size)
    sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
    return config


@dataclasses.dataclass(frozen=True)
class Data:
    """A run's data: the opened data set, its training examples, the splits each evaluation
    scores (metric prefix -> source; 'val/' selects models when there is a held-out part),
    the run's length in steps and the device batches of the training pipeline."""

    dataset: datasets.Dataset
    training: datasets.TrainingSplit
    eval_sets: dict[str, Any]
    total: int
    batches: sharding.DeviceBatches

    @property
    def num_train(self) -> int:
        return self.training.num_examples


def open_data(config: ml_collections.ConfigDict, mesh) -> tuple[ml_collections.ConfigDict, Data]:
    """(`config` with its asset names resolved to files, the run's `Data`)."""
    dataset = datasets.open_dataset(config.data)
    training = datasets.training_split(dataset, config.data)
    eval_sets = {"eval/": dataset.sources[config.data.eval_split]}
    if training.holdout is not None:
        eval_sets["val/"] = training.holdout
    evaluation.check_best_metric(config, list(eval_sets))
    total = config_lib.total_steps(config, training.num_examples)
    config = assets.resolve(config, dataset.class_names, dataset.directory)
    batches = sharding.DeviceBatches(
        iter(pipeline.train_dataset(training.source, config, dataset.num_classes)), mesh
    )
    return config, Data(dataset, training, eval_sets, total, batches)


def initial_state(
    config: ml_collections.ConfigDict,
    data: Data,
    mesh,
    ckpts: checkpointing.TrainCheckpoints,
    workdir: epath.Path,
):
    """(method module, graphdef, optimizer, state, step) to start from: the newest readable
    checkpoint's state, with the data iterator's position restored in place, or a fresh state
    at step 0 for a new run. A resumed run restores into the state's shapes
    (`train_state.abstract_train_state`): nothing is initialised only to be overwritten."""
    num_classes, repl = data.dataset.num_classes, sharding.replicated(mesh)
    if ckpts.latest_step() is not None:
        mod, graphdef, tx, abstract = train_state.abstract_train_state(
            config, num_classes, data.total, data.training
        )
        abstract = sharding.place_like(abstract, sharding.state_shardings(mesh, abstract))
        # `health` is the fresh one for checkpoints written before it existed.
        health = {divergence.HEALTH: jax.device_put(divergence.initial_health(), repl)}
        start, restored = ckpts.restore_latest(abstract, data.batches, defaults=health)
        logging.info("resumed %s at step %d", workdir, start)
        return mod, graphdef, tx, restored, int(start)
    mod, graphdef, tx, state = train_state.init_train_state(
        config, num_classes, data.total, data.training
    )
    return mod, graphdef, tx, jax.device_put(state, sharding.state_shardings(mesh, state)), 0


def finished(logged: list[dict], step: int, total: int, workdir) -> dict[str, float] | None:
    """The last evaluation's metrics when the run in `workdir` has nothing left to do (its
    last step reached, or stopped early), after saying so; else None."""
    stopped_early = any(r.get("early_stop") for r in logged)
    if step < total and not stopped_early:
        return None
    history = [r for r in logged if "eval/ema_mAP" in r]
    last = history[-1] if history else {}
    log(
        f"{workdir}: training already finished at step {step}/{total}"
        f"{' (early stop)' if stopped_early else ''} "
        f"(eval/mAP {last.get('eval/mAP', float('nan')):.2f}, "
        f"eval/ema_mAP {last.get('eval/ema_mAP', float('nan')):.2f}); nothing to do"
    )
    return {k: v for k, v in last.items() if k != "step"}


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`; returns the last evaluation's metrics.

    The run holds the workdir's lock throughout, and SIGTERM or SIGINT stops it after the
    current step with a checkpoint (a second one exits at once).

    A run that fails to start (a bad setting, a data set not built, a model that cannot be
    built) leaves the workdir as it was: the config is checked before the workdir is touched,
    config.json is written only once the run has a checkpoint (`Loop.save`) or has restored one,
    and a workdir this call created is removed again while it is empty.

    Raises:
      ConfigError: a setting no run can use (`check_config`).
      WorkdirError: another run holds the workdir, or it holds another config's run.
      DivergenceError: a non-finite step (without `config.optimizer.skip_nonfinite`).
    """
    config = check_config(config)
    with paths.faults_as_errors(workdir, f"create --workdir {workdir}"):
        fresh = not paths.path(workdir, "--workdir").exists()
    workdir = workdirs.create(workdir)
    try:
        with (
            workdir_lock.hold(workdir) as lock,
            preemption.StopSignals(on_exit=lock.release) as signals,
        ):
            return _run(config, workdir, signals)
    except BaseException:
        if fresh:
            workdirs.remove_if_empty(workdir)
        raise


def _run(config, workdir: epath.Path, signals: preemption.StopSignals) -> dict[str, float]:
    """Set up, restore, then train with evaluations and checkpoints (`Loop`)."""
    record = workdirs.config_record(config)  # before asset names are resolved to files
    workdirs.check_same_run(workdir, record)
    mesh = sharding.make_mesh()
    config, data = open_data(config, mesh)
    ckpts = checkpointing.TrainCheckpoints(
        workdir / workdirs.CHECKPOINTS, keep=config.keep_checkpoints, repair=True, config=record
    )
    try:
        mod, graphdef, tx, state, step = initial_state(config, data, mesh, ckpts, workdir)
        if step:  # resumed: the checkpoint is of this config (check_same_run)
            workdirs.record_config(workdir, record)
        logged = [r for r in read_metrics(workdir) if r["step"] <= step]
        done = finished(logged, step, data.total, workdir)
        if done is not None:
            return done
        loop = Loop(config, workdir, mesh, data, mod, graphdef, tx, state, ckpts, signals)
        return loop.run(state, step, logged)
    finally:
        ckpts.close()
        data.batches.close()


class Loop:
    """The steps of one run from its restored step on: train steps, logging, the epoch
    hooks, evaluations, checkpoints, and the stop (the last step, an early stop, a signal).

    Its parts are jitted once, for the layout of `state` on `mesh`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: epath.Path,
        mesh,
        data: Data,
        mod,
        graphdef: nnx.GraphDef,
        tx,
        state: dict,
        ckpts: checkpointing.TrainCheckpoints,
        signals: preemption.StopSignals,
    ):
        self.config, self.workdir, self.data, self.mod = config, workdir, data, mod
        self.ckpts, self.signals = ckpts, signals
        self.train_step = train_step.jit_train_step(
            mod, graphdef, tx, config, data.total, mesh, state
        )
        num_classes = data.dataset.num_classes
        # With decay 0 the EMA is the model, bit for bit: score once and report it for both.
        pairs_of = evaluation.model_and_ema if config.ema.decay else evaluation.live
        self.scorer = evaluation.Scorer(mod, config, graphdef, mesh, state, num_classes, pairs_of)
        self.epoch_end = getattr(mod, "epoch_end", None)
        self.hooks = None
        if self.epoch_end is not None:
            live = evaluation.Scorer(
                mod, config, graphdef, mesh, state, num_classes, evaluation.live
            )
            self.hooks = HookContext(
                config, mesh, data.training.source, num_classes, graphdef, live
            )
        self.eval_every = config.eval_every_steps
        if config.eval_every_epochs:
            per_epoch = data.num_train / config.batch_size
            self.eval_every = max(1, math.ceil(config.eval_every_epochs * per_epoch))
        num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        num_trainable = optim.trainable_size(state["params"], config.optimizer)
        self.summary = (
            f"training {config.model.name} ({num_params:,} parameters, {num_trainable:,} "
            f"trainable) on {data.dataset.name} ({data.num_train} train, "
            f"{len(data.eval_sets['eval/'])} eval images, {num_classes} classes) for "
            f"{data.total} steps of {config.batch_size} on {jax.device_count()} device(s)"
        )

    def run(self, state: dict, step: int, logged: list[dict]) -> dict[str, float]:
        """Train from `step` (`logged`: the metrics lines up to it) to the stop; returns the
        last evaluation's metrics."""
        config, data = self.config, self.data
        stop = min(data.total, config.stop_at_step) if config.stop_at_step else data.total
        log(f"{self.summary}; starting at step {step}")
        # Lines logged after the restored step (by a run stopped or killed since) are cut.
        self.writer = MetricWriter(self.workdir, resume_step=step)
        self.best_so_far = max(
            (r[config.best_metric] for r in logged if config.best_metric in r), default=-np.inf
        )
        self.last_eval: dict[str, float] = {}
        self.t0, self.step0 = time.time(), step
        self.recorded = step > 0  # `_run` wrote config.json when it restored the checkpoint
        stopped_by = None  # the signal that stopped the run, if one did
        try:
            while step < stop:
                state, train_metrics = self.train_step(state, next(data.batches))
                data.batches.prefetch()  # host input for the next step while this one runs
                step += 1
                state, stopped_by, best_by = self.after_step(state, step, stop, train_metrics)
                if stopped_by or (self.last_eval.get("early_stop") and best_by is not None):
                    break
        finally:
            self.writer.close()
        self.say_end(step, stopped_by)
        return self.last_eval

    def after_step(self, state: dict, step: int, stop: int, train_metrics: dict):
        """Log, run the epoch hook, evaluate and checkpoint as `step` calls for; returns (the
        state, the signal that asks to stop or None, the evaluation's checkpoint ranking or
        None)."""
        config = self.config
        at_log = step % config.log_every_steps == 0 or step == stop
        epoch = epochs_done(step, config.batch_size, self.data.num_train)
        new_epoch = epoch > epochs_done(step - 1, config.batch_size, self.data.num_train)
        at_hook = self.hooks is not None and new_epoch
        at_eval = step % self.eval_every == 0 or step == stop
        every = config.checkpoint_every_steps
        at_save = at_eval or bool(every and step % every == 0)
        stopped_by = None
        if self.signals.should_stop(step - self.step0):
            stopped_by, at_save = self.signals.describe(), True
        # Only where the host waits for the device anyway: no state past a non-finite step is
        # logged, hooked, evaluated or saved.
        if at_log or at_hook or at_save:
            skipped = divergence.check(
                state, config.optimizer.skip_nonfinite, self.ckpts.latest_step()
            )
        if at_log:
            self.log_train(step, train_metrics, skipped)
        if at_hook:
            state = self.epoch_end(self.hooks, state, epoch)
        best_by = self.evaluate(state, step) if at_eval else None
        if at_save:
            self.save(step, state, best_by)
        return state, stopped_by, best_by

    def save(self, step: int, state: dict, best_by: dict[str, float] | None) -> None:
        """Checkpoint `step` (with a copy of the run's config); a new run writes config.json at
        its first checkpoint, never before (a resumed one did when it restored)."""
        self.ckpts.save(step, state, self.data.batches, best_by)
        if not self.recorded:
            workdirs.record_config(self.workdir, self.ckpts.config)
            self.recorded = True

    def log_train(self, step: int, train_metrics: dict, skipped: int) -> None:
        """Write the step's training metrics and print the progress line."""
        batch, total = self.config.batch_size, self.data.total
        values = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        rate = (step - self.step0) * batch / (time.time() - self.t0)
        left = (total - step) * batch / max(rate, 1e-9)
        self.writer.write(step, {f"train/{k}": v for k, v in values.items()})
        log(
            f"step {step}/{total} loss {values['loss']:.4f} lr {values['lr']:.2e} | "
            f"{rate:.1f} img/s | {left / 60:.1f} min left"
            + (f" | {skipped} non-finite updates skipped" if skipped else "")
        )

    def evaluate(self, state: dict, step: int) -> dict[str, float]:
        """Evaluate every split of the run, log and write the metrics, decide an early stop;
        returns the checkpoint's ranking ({BEST_METRIC: config.best_metric's value})."""
        config = self.config
        self.last_eval = {}
        for prefix, source in self.data.eval_sets.items():
            what = f"{prefix[:-1]} at step {step}"
            _, found = self.scorer.evaluate(state, source, (prefix, f"{prefix}ema_"), what)
            self.last_eval |= found
            views = [v.name for v in self.scorer.views]
            for line in evaluation.summary_lines(found, prefix, step, views):
                log(line)
        value = self.last_eval[config.best_metric]
        if config.early_stop and value <= self.best_so_far:
            self.last_eval["early_stop"] = 1.0
            log(
                f"early stop at step {step}: {config.best_metric} {value:.2f} did not "
                f"improve on {self.best_so_far:.2f}"
            )
        self.best_so_far = max(self.best_so_far, value)
        self.writer.write(step, self.last_eval)
        return {checkpointing.BEST_METRIC: value}

    def say_end(self, step: int, stopped_by: str | None) -> None:
        """The run's last line: finished, stopped by a signal, or stopped at stop_at_step."""
        total = self.data.total
        if step >= total or self.last_eval.get("early_stop"):
            log(
                f"finished: {self.workdir} (best step by {self.config.best_metric}: "
                f"{self.ckpts.best_step()})"
            )
        elif stopped_by:
            log(
                f"{stopped_by}: stopped at step {step}/{total} with a checkpoint; run the same "
                "command to resume"
            )
        else:
            log(f"stopped at step {step}/{total}; run the same command to resume")

"""Checkpoint I/O. The only module that imports orbax.

Two kinds of checkpoint:
* a *weights* checkpoint (`save_weights` / `load_weights`): one pytree of arrays plus a small
  JSON of settings, written by the converter and read by `init_from` and `evaluate`;
* the *training* checkpoints of a workdir (`TrainCheckpoints`): model, optimizer, EMA, method
  buffers and the grain iterator saved together by an Orbax `CheckpointManager` that keeps the
  latest `keep` steps and the best by `config.best_metric`.

A checkpoint that fails to read (a truncated or emptied file) is never the end of a run: the
newest readable one is restored instead (`restore_latest`), and the unreadable newer ones are
reported in one line each and moved to `unreadable_checkpoints/` beside `checkpoints/`, out of
the way of the steps the run writes again (nothing is deleted).

A checkpoint that cannot be written (a full disk, a read-only or unreachable workdir) is one
`StorageError` line naming the step, the space needed and free, and the step to resume from;
the partly written step is removed. Orbax's and asyncio's echoes of a failed read or write
(tracebacks of abandoned array operations, logged copies of the error) are dropped: the error
itself is reported once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import pathlib
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from mlgraph import paths
from mlgraph.errors import ConfigError, StorageError, WorkdirError, warn

WEIGHTS_DIR = "weights"
EXTRA_DIR = "extra"
SETTINGS_FILE = "settings.json"


def save_weights(
    path: str | pathlib.Path,
    tree: Any,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
):
    """Write a pytree of arrays (e.g. `nnx.to_pure_dict(state)`) and its settings to `path`,
    and `extra`, arrays of the method's per-example state (`load_extra`), when given.

    Refuses to overwrite: an existing `path` is an error, so nothing already written is lost.
    """
    path = paths.path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new output path")
    if not paths.is_cloud(path) and not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: parent folder of the output does not exist")
    tree = jax.tree.map(np.asarray, tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / WEIGHTS_DIR, tree)
        if extra:
            ckptr.save(path / EXTRA_DIR, jax.tree.map(np.asarray, dict(extra)))
    (path / SETTINGS_FILE).write_text(json.dumps(dict(settings or {}), indent=2, sort_keys=True))


def load_weights_settings(path: str | pathlib.Path) -> dict[str, Any]:
    """The settings of a checkpoint written by `save_weights` ({} when it has none), without
    reading its arrays."""
    path = paths.path(path)
    if not (path / WEIGHTS_DIR).is_dir():
        raise FileNotFoundError(
            f"{path}: not a mlgraph weights checkpoint (expected a '{WEIGHTS_DIR}/' folder "
            f"written by `python -m mlgraph.convert`)"
        )
    settings_file = path / SETTINGS_FILE
    return json.loads(settings_file.read_text()) if settings_file.exists() else {}


def load_weights(path: str | pathlib.Path) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by `save_weights`: returns (pytree of numpy arrays, settings)."""
    settings = load_weights_settings(path)
    return _restore_item(paths.path(path) / WEIGHTS_DIR), settings


def load_extra(path: str | pathlib.Path) -> dict[str, Any]:
    """The per-example state a weights checkpoint carries (`save_weights(..., extra=)`, e.g.
    Scob's label estimator 'phi'), as numpy arrays; {} when it has none."""
    item = paths.path(path) / EXTRA_DIR
    return dict(_restore_item(item)) if item.is_dir() else {}


def _restore_item(item: pathlib.Path) -> Any:
    """A pytree saved by `StandardCheckpointer` at `item`, as host numpy arrays."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item)
        tree_meta = getattr(meta, "item_metadata", meta)
        abstract = jax.tree.map(
            lambda m: np.empty(m.shape, m.dtype) if hasattr(m, "shape") else m, tree_meta
        )
        tree = ckptr.restore(item, abstract)
    return jax.tree.map(np.asarray, tree)


def _names(path) -> tuple[str, ...]:
    """A pytree path as plain names, whatever the container types (dicts, lists, State)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fill_from(target: Any, saved: Any, what: str, field: str = "config.init_from") -> Any:
    """`target` (e.g. a model's abstract state) with every leaf replaced by the leaf of `saved`
    (a restored tree of nested dicts) at the same path, in the target's dtype.

    Raises:
      ConfigError: naming `field` and `what`, for a leaf missing from `saved` or of another
        shape.
    """
    found = {_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}

    def pick(path, leaf):
        value = found.get(_names(path))
        if value is None or tuple(value.shape) != tuple(leaf.shape):
            raise ConfigError(
                f"{field}: {what} has no {'/'.join(_names(path))} of shape "
                f"{tuple(leaf.shape)} (found {None if value is None else tuple(value.shape)})"
            )
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, target)


BEST_METRIC = "best"  # the saved metric checkpoints are ranked by (config.best_metric's value)


def _best(metrics: Mapping[str, float]) -> float:
    # Workdirs written before `best` existed ranked by their EMA mAP under this key.
    return metrics[BEST_METRIC] if BEST_METRIC in metrics else metrics["ema_mAP"]


class _NoMetricsBetweenEvaluations(logging.Filter):
    """Drops Orbax's warning for a step saved without metrics: the steps between evaluations
    (`checkpoint_every_steps`, a stop on SIGTERM) have none by design."""

    def filter(self, record) -> bool:
        return "did not provide metrics" not in record.getMessage()


absl_logging.get_absl_logger().addFilter(_NoMetricsBetweenEvaluations())

UNREADABLE_DIR = "unreadable_checkpoints"  # beside checkpoints/: steps that failed to read
METRICS_FILE = pathlib.Path("metrics") / "metrics"  # Orbax's per-step metrics, inside a step
# Orbax's per-step metadata (JSON), inside a step; its `custom_metadata` keeps the run's config
# under CONFIG_KEY, so a workdir that lost its config.json still knows what it holds.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
CONFIG_KEY = "config"


def step_folders(directory: str | pathlib.Path) -> list[int]:
    """The steps saved in a `checkpoints/` folder (its finished step folders), oldest first,
    read from the folder itself (no `CheckpointManager`, which reads every step's metrics)."""
    directory = paths.path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(f.name) for f in directory.iterdir() if f.name.isdigit())


def saved_config(directory: str | pathlib.Path, step: int) -> dict | None:
    """The run's config kept with checkpoint `step` (`TrainCheckpoints(config=...)`), None when
    the step predates the copy or its metadata cannot be read."""
    path = paths.path(directory) / str(step) / STEP_METADATA_FILE
    try:
        custom = json.loads(path.read_text()).get("custom_metadata") or {}
    except (ValueError, OSError, AttributeError):
        return None
    config = custom.get(CONFIG_KEY)
    return config if isinstance(config, dict) else None


def describe_error(error: BaseException) -> str:
    """One line for a read failure: the innermost cause's first line (Orbax wraps TensorStore's
    one-line reason in a message that spans dozens of lines)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


_ORBAX_DIR = pathlib.Path(ocp.__file__).parent.parent  # site-packages/orbax


def _in_orbax(filename: str) -> bool:
    return pathlib.Path(filename).is_relative_to(_ORBAX_DIR)


def _raised_in_orbax(error: BaseException | None) -> bool:
    """Whether `error`'s traceback passes through Orbax's code."""
    tb = getattr(error, "__traceback__", None)
    while tb is not None:
        if _in_orbax(tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return False


class _QuietAbandonedIO:
    """A `sys.unraisablehook` that drops the reports of the array reads and writes Orbax
    abandons when one array of a checkpoint fails (a truncated file, a full disk), and passes
    every other report on.

    Each abandoned operation prints its own multi-line report as it finishes or is collected
    (its coroutine's error, or TensorStore's callback into the event loop Orbax has closed),
    often before Orbax raises the first failure, or long after, at exit; the failure itself is
    reported once, in one line.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        error, source = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        code = getattr(source, "cr_code", None) or getattr(source, "__code__", None)
        if code is not None and _in_orbax(code.co_filename):
            return
        self.previous(unraisable)


# TensorStore's errors (Orbax's array I/O) carry their status code first.
_TENSORSTORE_STATUS = re.compile(
    r"(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
    r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
    r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): "
)


# Orbax's notices of a step's metadata file it does without (a step being deleted by the run
# that wrote it, or damaged): mlgraph's step policy says what it could not use, in one line.
_ORBAX_METADATA_NOTICES = (
    "Metadata file does not exist: %s",
    "Failed to read Metadata file: %s, error: %s",
)


class _QuietOrbaxEchoes(logging.Filter):
    """Drops the log records that repeat an error of a checkpoint's I/O: one raised in
    Orbax's code (its background threads log the error they hand back) or TensorStore's
    (asyncio logs the errors of the sibling array operations no one retrieved once the first
    one is raised). The caller gets the error and reports it in one line. Orbax's notices of a
    missing metadata file go too."""

    def filter(self, record) -> bool:
        if record.msg in _ORBAX_METADATA_NOTICES and _in_orbax(record.pathname):
            return False
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or error is None:
            return True
        from_tensorstore = _TENSORSTORE_STATUS.match(str(error)) is not None
        return not (from_tensorstore or _raised_in_orbax(error))


_QUIET_ORBAX_ECHOES = _QuietOrbaxEchoes()
for _logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
    _logger.addFilter(_QUIET_ORBAX_ECHOES)


def _quiet_abandoned_io() -> None:
    """Before a checkpoint read or write: keep the reports of its abandoned operations, if it
    fails, off the terminal (installed once; they can come before the failure is raised)."""
    if not isinstance(sys.unraisablehook, _QuietAbandonedIO):
        sys.unraisablehook = _QuietAbandonedIO(sys.unraisablehook)


def _after_failed_io() -> None:
    """After a failed checkpoint read or write: collect its abandoned operations now, while
    their reports are dropped; those never started warn, when collected, that they were never
    awaited (often at exit): from here on that warning is dropped too."""
    _quiet_abandoned_io()
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    gc.collect()


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (one small all-gather when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def first_readable(
    steps: Sequence[int], read: Callable[[int], Any]
) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """`read(step)` of the first of `steps` that every process reads.

    Returns:
      (its step, what `read` gave, [(step, reason) of each step before it that failed]); the
      step and value are None when none could be read.
    """
    failed = []
    _quiet_abandoned_io()
    for step in steps:
        reason, value = None, None
        try:
            value = read(step)
        except Exception as e:  # any read failure: truncated, emptied, missing files
            reason = describe_error(e)
        if reason is not None:
            _after_failed_io()
        if _everywhere(reason is None):
            return step, value, failed
        failed.append((step, reason or "unreadable on another process"))
    return None, None, failed


class TrainCheckpoints:
    """The checkpoints of a training workdir: train state and data iterator, saved together.

    Keeps the latest `keep` steps (the resume point and the one before it, in case the newest
    is damaged) and the evaluated step with the best metric (`config.best_metric`, saved as
    `best`).

    Args:
      directory: the workdir's `checkpoints/`.
      keep: how many of the newest steps to keep (`config.keep_checkpoints`).
      repair: (training) a step whose metrics file cannot be read is reported and moved aside
        instead of failing; otherwise (evaluation, inspection) it is a `WorkdirError`.
      config: (training) the run's config as JSON data, kept with each step saved
        (`saved_config`).
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        keep: int = 2,
        repair: bool = False,
        config: Mapping[str, Any] | None = None,
    ):
        self.directory = paths.path(directory)
        self.keep = int(keep)
        self.config = None if config is None else dict(config)
        try:
            self.manager = self._open()
        except Exception as e:  # Orbax reads every step's metrics when it opens the folder
            bad = self._unreadable_metrics()
            if not bad:
                raise
            if not repair:
                step, reason = bad[0]
                raise WorkdirError(
                    f"{self.directory / str(step) / METRICS_FILE}: cannot be read ({reason}); "
                    f"move {self.directory / str(step)} away to use the other checkpoints"
                ) from e
            for step, reason in bad:
                self._set_aside(step, reason)
            self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        import grain

        policies = ocp.checkpoint_managers
        return ocp.CheckpointManager(
            self.directory,
            # Named up front so that the saved structure can be read back before any restore
            # (`read_state` of a checkpoint written on other devices or hosts).
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(
                    [
                        policies.LatestN(n=self.keep),
                        # Steps saved between evaluations have no metrics: only LatestN keeps them.
                        policies.BestN(
                            get_metric_fn=_best,
                            reverse=False,
                            n=1,
                            keep_checkpoints_without_metrics=False,
                        ),
                    ]
                ),
                best_fn=_best,
                best_mode="max",
                enable_async_checkpointing=False,
            ),
        )

    def _unreadable_metrics(self) -> list[tuple[int, str]]:
        """(step, reason) of each step folder whose metrics file is not JSON."""
        bad = []
        for step in step_folders(self.directory):
            path = self.directory / str(step) / METRICS_FILE
            try:
                if path.exists():
                    json.loads(path.read_text())
            except (ValueError, OSError) as e:
                bad.append((step, describe_error(e)))
        return bad

    def _set_aside(self, step: int, reason: str, then: str = "") -> None:
        """Move the unreadable `step` to `unreadable_checkpoints/` (process 0; all wait), with a
        one-line warning saying why and where it went."""
        target = self.directory.parent / UNREADABLE_DIR / str(step)
        if target.exists():  # the same step failed before: keep both
            target = target.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            paths.move(self.directory / str(step), target)
            warn(
                f"checkpoint step {step} in {self.directory} cannot be read ({reason}); "
                f"moved it to {target}{then}"
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mlgraph: set aside checkpoint {step}")

    def latest_step(self) -> int | None:
        """The newest saved step, or None for a fresh workdir."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the best metric (`config.best_metric`; by default the EMA mAP)."""
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        """Every step still on disk."""
        return list(self.manager.all_steps())

    def pick_step(self, step: int | None = None) -> int:
        """`step`, or by default the best step (else the latest, when none was evaluated).

        Raises:
          WorkdirError: no checkpoints, or `step` is not saved (the saved ones are listed).
        """
        workdir, steps = self.directory.parent, self.all_steps()
        if not steps:
            raise WorkdirError(f"--workdir {workdir}: no checkpoints in {self.directory}")
        if step is None:
            best = self.best_step()
            return best if best is not None else self.latest_step()
        if step not in steps:
            raise WorkdirError(f"--step {step}: not saved in {workdir}; saved steps: {steps}")
        return step

    def save(
        self, step: int, state: Any, data_iterator, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Save `state` and the data iterator (anything with grain's `get_state`/`set_state`)
        at `step`, with the run's config when given; `metrics` holds `best` at evaluation steps
        and is None between them.

        Raises:
          StorageError: the step cannot be written (a full disk, a read-only or unreachable
            workdir): one line naming it, the space needed and free, and the step a run of the
            same command resumes from. The partly written step is removed; saved ones are kept.
        """
        import grain

        _quiet_abandoned_io()
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                ),
                metrics=None if metrics is None else dict(metrics),
                custom_metadata=None if self.config is None else {CONFIG_KEY: self.config},
            )
            self.manager.wait_until_finished()
        except Exception as e:
            fault = paths.storage_fault(e, self.directory)
            if fault is None:
                raise
            _after_failed_io()
            self._remove_partial(step)
            # Listed only now: a failed save never counts among the saved steps.
            latest = max((s for s in self.all_steps() if s < step), default=None)
            start = f"resume from step {latest}" if latest is not None else "start again"
            message = paths.fault_message(
                fault,
                f"write checkpoint step {step} in {self.directory}",
                self.directory,
                self._bytes_needed(state, latest),
                f"then run the same command to {start}",
            )
            raise StorageError(message) from e

    def _bytes_needed(self, state: Any, latest: int | None) -> int:
        """About what a checkpoint takes: the newest saved one's files on a local disk, else
        the state's arrays."""
        if latest is not None and not paths.is_cloud(self.directory):
            files = pathlib.Path(self.directory / str(latest)).rglob("*")
            return sum(f.stat().st_size for f in files if f.is_file())
        return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))

    def _remove_partial(self, step: int) -> None:
        """Remove what a failed save of `step` wrote (Orbax's temporary folder: never a saved
        checkpoint), so that its space is free again (process 0)."""
        if jax.process_index() != 0:
            return
        # Orbax's abandoned array writes may still be adding files: remove until it stays gone.
        for _ in range(10):
            partial = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            if not partial:
                return
            for folder in partial:
                with contextlib.suppress(OSError):
                    folder.rmtree(missing_ok=True)
            time.sleep(0.2)

    def restore(
        self,
        step: int,
        abstract_state: Any,
        data_iterator=None,
        defaults: Mapping[str, Any] | None = None,
    ) -> Any:
        """Restore the state at `step` onto the shardings of `abstract_state`.

        When `data_iterator` is given its position is restored in place too. `defaults`: top-level
        entries of the state taken as given when the checkpoint predates them (a workdir written
        by an earlier version).
        """
        try:
            return self._restore(step, abstract_state, data_iterator)
        except Exception:
            if not defaults:
                raise
            older = {k: v for k, v in abstract_state.items() if k not in defaults}
            try:
                restored = self._restore(step, older, data_iterator)
            except Exception:
                pass  # not an older layout: report the first error
            else:
                return dict(restored, **defaults)
            raise

    def _restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        import grain

        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_first(
        self,
        steps: Sequence[int],
        abstract_state: Any,
        data_iterator=None,
        defaults: Mapping[str, Any] | None = None,
    ) -> tuple[int | None, Any, list[tuple[int, str]]]:
        """Restore the first of `steps` that every process reads (`restore`'s arguments).

        Returns:
          (its step, its state, [(step, reason) of each step before it that failed]); the step
          and state are None when none could be read.
        """
        return first_readable(
            steps, lambda step: self.restore(step, abstract_state, data_iterator, defaults)
        )

    def restore_latest(
        self, abstract_state: Any, data_iterator=None, defaults: Mapping[str, Any] | None = None
    ) -> tuple[int | None, Any]:
        """Restore the newest readable step (`restore`'s arguments): (step, state), or
        (None, None) for a workdir without checkpoints.

        Newer steps that fail to read are reported (one line each) and moved aside, so that the
        run writes those steps again.

        Raises:
          WorkdirError: there are checkpoints but none can be read.
        """
        steps = sorted(self.all_steps(), reverse=True)
        step, state, failed = self.restore_first(steps, abstract_state, data_iterator, defaults)
        if step is None and failed:
            reasons = "; ".join(f"step {s}: {r}" for s, r in failed)
            raise WorkdirError(
                f"{self.directory}: no checkpoint can be read ({reasons}); move "
                f"{self.directory} away to start over"
            )
        for bad, reason in failed:
            self._set_aside(bad, reason, f"; resuming from step {step}")
        if failed:
            self.manager.reload()
        return step, state

    def read(
        self, step: int, parts: Sequence[str] | None = None, sharding: Any = None
    ) -> dict[str, Any]:
        """The top-level entries `parts` (default: all) of the train state saved at `step`, as
        arrays on `sharding` (default: this host's first device), the rest left unread; a part
        the checkpoint does not hold (one written before the part existed) is left out. The
        structure comes from the checkpoint itself, so no state needs to be built first.
        """
        meta = dict(self.manager.item_metadata(step)["state"])
        parts = list(meta) if parts is None else [p for p in parts if p in meta]
        # Readable whatever devices (or hosts) wrote the checkpoint.
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {
            p: jax.tree.map(
                lambda m: (
                    jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
                    if hasattr(m, "shape")
                    else m
                ),
                meta[p],
            )
            for p in parts
        }
        # The manager's handler reads whole states; a PyTree read of the same files may leave
        # parts out (the optimizer state, twice the parameters, is not needed to use a model).
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(
                self.directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )

    def read_state(self, step: int) -> Any:
        """The whole train state saved at `step` as host numpy arrays (for inspection and
        tests; training restores with `restore`)."""
        return jax.tree.map(np.asarray, self.read(step))

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

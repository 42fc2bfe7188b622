"""A training run's folder: its config, its checkpoints, and the one way to open its model.

    DIR/config.json       the run's config (written once the run has a checkpoint; a copy
                          is kept with each checkpoint too, compared on resume)
    DIR/metrics.jsonl     one JSON object a line (`mlgraph.metric_writer`)
    DIR/checkpoints/      Orbax training checkpoints (`mlgraph.checkpointing.TrainCheckpoints`)

Every command that reads a run (`evaluate`, `predict`, `viz`, `bench --workdir` and a training
workdir as `config.init_from`) opens it here, so a damaged workdir gets the same answer from
each. The step policy:

* by default the best step (by `config.best_metric`), else the newest; a step that cannot be
  read (a truncated or emptied file) is named in one `warning:` line and the next newest
  readable one is used;
* `--step N` is that step exactly, or a one-line error naming the saved steps.

Reading never moves or repairs anything (a training run does that when it resumes:
`checkpointing.TrainCheckpoints.restore_latest`), and never initialises a model: the model is
built abstractly (`nnx.eval_shape`) and the arrays come from the checkpoint, whose own metadata
gives their structure; the optimizer state is left on disk.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from mlgraph import assets, checkpointing, config_lib, models, paths, sharding
from mlgraph.data import augment, datasets
from mlgraph.errors import ConfigError, WorkdirError, warn

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
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
# What using a model needs of the saved train state (the optimizer state is not read).
MODEL_PARTS = ("params", "rest", "ema", "extra", "step")
RACE_TRIES = 5  # reads of a workdir whose steps a run deletes as it saves newer ones
GONE_GRACE_S = 1.0  # Orbax deletes a step's files first and its folder last


# ---------------------------------------------------------------------------------------------
# The folder and its config
# ---------------------------------------------------------------------------------------------
def create(workdir: str | pathlib.Path) -> epath.Path:
    """`workdir` as an absolute path (local) or as given (cloud), created if needed (a local
    parent folder must exist; object stores have no folders to check).

    Raises:
      StorageError: a cloud workdir without its storage backend installed, or one that cannot
        be reached or used with these credentials; a folder that cannot be created.
      WorkdirError: the parent of a local workdir, or the bucket of a cloud one, does not
        exist.
    """
    workdir = paths.path(workdir, "--workdir")
    if not paths.is_cloud(workdir) and not workdir.parent.is_dir():
        raise WorkdirError(f"--workdir {workdir}: parent folder {workdir.parent} does not exist")
    try:
        with paths.faults_as_errors(workdir, f"create --workdir {workdir}"):
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


def remove_if_empty(workdir: epath.Path) -> None:
    """Remove a local `workdir` and its `checkpoints/` folder where they are empty (after a run
    that created the workdir failed to start); anything with a file in it stays."""
    if paths.is_cloud(workdir) or jax.process_index() != 0:
        return  # an object store has no empty folders to leave behind
    for folder in (workdir / CHECKPOINTS, workdir):
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _read_saved(workdir: epath.Path) -> dict | None:
    """The parsed config.json of `workdir`, upgraded to today's fields; None without one."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise WorkdirError(f"{path}: not JSON ({e}); it records the run's config") from None
    return upgrade_config(saved)


def upgrade_config(saved: dict) -> dict:
    """A config.json written by an earlier mlgraph, in today's fields (a config of today comes
    back as it was); what the run computes is unchanged by the rewrite:

    * `data.demo` ('demo', 'digits-mosaic') becomes the data set's name (`data.name`);
    * `data.augment` as a dict of switches becomes the name of the chain they make
      (`augment.chain_name_of`; a combination no chain makes is kept, and resuming the run
      then names the differing fields);
    * `loss` held every method's fields; the method reads only those of its `Loss`, which are
      kept (with the defaults of any it lacked).
    """
    saved = copy.deepcopy(saved)
    data = saved.get("data") or {}
    if "demo" in data:  # the embedded sets were a flag on the COCO builder's name
        demo = data.pop("demo")
        if demo:
            data["name"] = demo.replace("-", "_")
    if isinstance(data.get("augment"), dict):
        try:
            data["augment"] = augment.chain_name_of(data["augment"])
        except ConfigError:
            pass
    method = (saved.get("model") or {}).get("name")
    if method and isinstance(saved.get("loss"), dict):
        declared = models.loss_defaults(method)
        saved["loss"] = declared | {k: v for k, v in saved["loss"].items() if k in declared}
    return saved


def config_record(config: ml_collections.ConfigDict) -> dict:
    """What a run keeps of `config`, in config.json and with each checkpoint: its JSON data."""
    return json.loads(config.to_json_best_effort())


def _checkpoint_config(workdir: epath.Path) -> tuple[list[int], int | None, dict | None]:
    """(the steps saved in `workdir`, the newest of them that keeps a copy of the run's config,
    that copy in today's fields); (steps, None, None) when none does."""
    directory = workdir / CHECKPOINTS
    steps = checkpointing.step_folders(directory)
    for step in reversed(steps):
        saved = checkpointing.saved_config(directory, step)
        if saved is not None:
            return steps, step, upgrade_config(saved)
    return steps, None, None


def _differing(previous: dict, current: dict) -> list[str]:
    """The fields, other than `RESUMABLE_CHANGES`, whose values differ between two configs."""
    a, b = config_lib.flatten(previous), config_lib.flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def check_same_run(workdir: epath.Path, record: dict) -> None:
    """Check that the run `record` (`config_record`) is the one `workdir` holds, if any: the
    config kept with its newest checkpoint, else its config.json. Writes nothing.

    A config.json with no checkpoints beside it (a run that never saved one) holds nothing to
    protect: a difference is a warning, and this run's config replaces it at its first
    checkpoint.

    Raises:
      WorkdirError: the workdir holds checkpoints of another config (the differing fields
        named), or checkpoints with neither a config.json nor a copy of their config.
    """
    steps, step, previous = _checkpoint_config(workdir)
    has_json = (workdir / CONFIG_FILE).exists()
    if previous is None:
        previous = _read_saved(workdir)
        if previous is None and steps:
            raise WorkdirError(
                f"--workdir {workdir}: has checkpoints (steps {', '.join(map(str, steps))}) but "
                f"no {CONFIG_FILE}, and they predate the config kept with each checkpoint; put "
                f"the run's {CONFIG_FILE} back, or use a new workdir"
            )
    changed = [] if previous is None else _differing(previous, record)
    if not changed:
        return
    if not steps:
        warn(
            f"--workdir {workdir}: its {CONFIG_FILE} is of another config (fields "
            f"{', '.join(changed)} differ) but has no checkpoints; this run's config replaces "
            "it at its first checkpoint"
        )
        return
    source = "" if has_json else f"; no {CONFIG_FILE}, compared with checkpoint step {step}"
    raise WorkdirError(
        f"--workdir {workdir}: holds a run of a different config (fields "
        f"{', '.join(changed)} differ{source}); use a new workdir"
    )


def record_config(workdir: epath.Path, record: dict) -> None:
    """Write the run's config (`config_record`) to `workdir/config.json` (process 0); called
    once the run has a checkpoint of it, after `check_same_run`.

    Raises:
      StorageError: config.json cannot be written (a full, read-only or unreachable workdir).
    """
    if jax.process_index() == 0:
        text = json.dumps(record, indent=2, sort_keys=True)
        # Replaced whole: a run killed mid-write, or a write that fails (a full disk), leaves
        # the run's record as it was.
        with paths.faults_as_errors(workdir / CONFIG_FILE, then="then run the same command"):
            paths.replace_text(workdir / CONFIG_FILE, text)


def read_config(workdir: str | pathlib.Path, flag: str = "--workdir") -> ml_collections.ConfigDict:
    """The config `workdir`'s run was trained with (`flag` names the argument in errors).

    Raises:
      WorkdirError: no such folder, or neither a config.json in it nor a checkpoint with a
        copy of its config (not a training workdir).
      StorageError: a cloud workdir that cannot be reached or read with these credentials.
    """
    workdir = paths.path(workdir, flag)
    # `exists` raises what keeps a cloud store out of reach; `is_dir` would say False.
    with paths.faults_as_errors(workdir, f"read {flag} {workdir}"):
        found = workdir.exists() and workdir.is_dir()
    if not found:
        raise WorkdirError(f"{flag} {workdir}: does not exist")
    saved = _read_saved(workdir)
    if saved is None:
        _, step, saved = _checkpoint_config(workdir)
        if saved is None:
            raise WorkdirError(f"{flag} {workdir}: no {CONFIG_FILE}; not a training workdir")
        warn(
            f"{flag} {workdir}: no {CONFIG_FILE}; using the config kept with checkpoint step "
            f"{step} (resuming the run writes {CONFIG_FILE} again)"
        )
    return ml_collections.ConfigDict(saved)


def is_run(path: str | pathlib.Path) -> bool:
    """Whether `path` is a training workdir (a config.json and a checkpoints folder)."""
    p = paths.path(path)
    return (p / CONFIG_FILE).is_file() and (p / CHECKPOINTS).is_dir()


# ---------------------------------------------------------------------------------------------
# The step policy
# ---------------------------------------------------------------------------------------------
def step_order(ckpts: checkpointing.TrainCheckpoints, step: int | None) -> list[int]:
    """The steps to try, in order: `step` alone, or the best step then the others newest
    first.

    Raises:
      WorkdirError: no checkpoints, or `step` is not saved (the saved ones are listed).
    """
    ckpts.pick_step(step)  # no checkpoint at all, or a --step not saved: one line
    if step is not None:
        return [step]
    best = ckpts.best_step()  # None when no step was evaluated
    return sorted(ckpts.all_steps(), key=lambda s: (s == best, s), reverse=True)


def read_state(
    workdir: str | pathlib.Path,
    step: int | None = None,
    parts: Sequence[str] = MODEL_PARTS,
    sharding: Any = None,
    flag: str = "--workdir",
) -> tuple[dict, int]:
    """(the `parts` of the train state saved in `workdir` at the step the policy picks, that
    step), as arrays on `sharding` (default: this host's first device). Parts a checkpoint of
    an earlier version lacks are left out.

    A step deleted while it is read (a run writing the workdir keeps only its newest steps)
    is a race, not damage: the steps are listed and the policy applied again (up to
    `RACE_TRIES` times).

    Raises:
      WorkdirError: no checkpoints, a step not saved, or no readable step (`step` given: that
        one); the steps changed under every try.
    """
    workdir = paths.path(workdir, flag)
    directory = workdir / CHECKPOINTS
    if not workdir.is_dir():
        raise WorkdirError(f"{flag} {workdir}: does not exist")
    if not directory.is_dir():
        raise WorkdirError(f"{flag} {workdir}: no checkpoints in {directory}")
    for _ in range(RACE_TRIES):
        attempt = _read_once(directory, step, parts, sharding)
        if attempt is not None:
            break
    else:
        raise WorkdirError(
            f"{directory}: the saved steps were deleted while being read, {RACE_TRIES} times "
            "(a run saving there keeps only its newest steps); try again, or stop that run"
        )
    found, state, failed, saved_steps = attempt
    if found is None:
        reasons = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise WorkdirError(
            f"{directory}: cannot read {reasons}; saved steps: {saved_steps}"
            + ("; pick another with --step N" if step is not None else "")
        )
    for bad, reason in failed:
        warn(
            f"checkpoint step {bad} in {directory} cannot be read ({reason}); using step "
            f"{found} instead (saved steps: {saved_steps})"
        )
    return state, int(found)


def _read_once(directory: epath.Path, step: int | None, parts: Sequence[str], sharding: Any):
    """One try of `read_state`'s policy: (the step read or None, its state, [(step, reason)
    of each step that failed], the saved steps as text), or None when a step it listed was
    deleted meanwhile."""
    before = _step_folders(directory)
    try:
        ckpts = checkpointing.TrainCheckpoints(directory)
    except Exception:  # Orbax reads every step's metrics as it opens the folder
        if before - _step_folders(directory):
            return None
        raise
    try:
        order = step_order(ckpts, step)
        read = lambda s: ckpts.read(s, parts, sharding)  # noqa: E731
        found, state, failed = checkpointing.first_readable(order, read)
        saved_steps = ", ".join(map(str, sorted(ckpts.all_steps())))
    finally:
        ckpts.close()
    if any(_deleted(directory / str(s)) for s, _ in failed):
        return None
    return found, state, failed, saved_steps


def _step_folders(directory: epath.Path) -> set[int]:
    """The steps with a folder in `directory` now."""
    return {int(p.name) for p in directory.iterdir() if p.name.isdigit()}


def _deleted(folder: epath.Path) -> bool:
    """Whether `folder` is gone, or goes within `GONE_GRACE_S` (a deletion in progress)."""
    deadline = time.monotonic() + GONE_GRACE_S
    while folder.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ---------------------------------------------------------------------------------------------
# The model of a run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """A training run's model as saved at one step, on this host's devices (replicated).

    Attributes:
      workdir: the run's folder.
      config: its config, with asset names resolved to files and `init_from` cleared (the
        checkpoint holds the weights).
      dataset: its opened data set (class names, evaluation split).
      graphdef: the model's graph definition.
      state: `params`, `rest` (the live model), `ema` ({params, rest}), `extra` (the method's
        per-example state, {} if none) and `step`, as training saved them, in the model's
        state structure; no optimizer state.
      step: the step read.
      mesh: the device mesh the arrays are replicated over.
      ema: whether `params`/`rest`/`model()` are the EMA model's (else the live model's).
    """

    workdir: epath.Path
    config: ml_collections.ConfigDict
    dataset: datasets.Dataset
    graphdef: nnx.GraphDef
    state: dict
    step: int
    mesh: Any
    ema: bool = True

    @property
    def params(self) -> Any:
        """The chosen model's parameters (`ema`: the EMA's)."""
        return (self.state["ema"] if self.ema else self.state)["params"]

    @property
    def rest(self) -> Any:
        """The chosen model's other state (batch statistics, buffers)."""
        return (self.state["ema"] if self.ema else self.state)["rest"]

    def model(self) -> nnx.Module:
        """The chosen model as an `nnx.Module`."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def abstract_model(
    config: ml_collections.ConfigDict, dataset: datasets.Dataset
) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract params, abstract rest) of `config`'s model on `dataset`: shapes and
    dtypes only (`nnx.eval_shape`), nothing initialised."""
    num_train = None
    if models.takes_num_train_examples(config.model.name):
        num_train = datasets.training_split(dataset, config.data).num_examples
    abstract = nnx.eval_shape(
        lambda: models.create(
            config, num_classes=dataset.num_classes, rngs=nnx.Rngs(0), num_train_examples=num_train
        )
    )
    return nnx.split(abstract, nnx.Param, ...)


def open_run(
    workdir: str | pathlib.Path,
    step: int | None = None,
    ema: bool = True,
    *,
    mesh: Any = None,
    flag: str = "--workdir",
) -> Run:
    """The model of the training run in `workdir` at `step` (the step policy of this module),
    its config and its data set; `ema` picks the EMA model as `Run.model()`.

    Raises:
      WorkdirError: not a training workdir, no checkpoints, no readable step.
      DataError: its data set is not built here.
      ConfigError: the checkpoint's arrays do not fit the model its config describes.
    """
    workdir = paths.path(workdir, flag)
    config = read_config(workdir, flag)
    config.init_from = ""  # the checkpoint holds the weights
    dataset = datasets.open_dataset(config.data)
    config = assets.resolve(config, dataset.class_names, dataset.directory)
    graphdef, params, rest = abstract_model(config, dataset)
    mesh = mesh or sharding.make_mesh()
    saved, found = read_state(workdir, step, sharding=sharding.replicated(mesh), flag=flag)
    where = f"{workdir} step {found}"

    def fill(tree: dict, what: str) -> dict:
        return {
            "params": checkpointing.fill_from(params, tree["params"], f"{what} params", flag),
            "rest": checkpointing.fill_from(rest, tree["rest"], f"{what} state", flag),
        }

    state = fill(saved, where)
    state["ema"] = fill(saved["ema"], f"{where} EMA") if "ema" in saved else dict(state)
    state["extra"] = saved.get("extra", {})
    state["step"] = saved.get("step", found)
    return Run(workdir, config, dataset, graphdef, state, found, mesh, ema)

"""Checkpoint I/O. The only module that imports orbax.

Two kinds of checkpoint:
* a *weights* checkpoint (`save_weights` / `load_weights`): one pytree of arrays plus a small
  JSON of settings, written by the converter and read by `init_from` and `evaluate`;
* the *training* checkpoints of a workdir (`TrainCheckpoints`): model, optimizer, EMA, method
  buffers and the grain iterator saved together by an Orbax `CheckpointManager` that keeps the
  latest step and the best by EMA mAP.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

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
    path = pathlib.Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new output path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: parent folder of the output does not exist")
    tree = jax.tree.map(np.asarray, tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / WEIGHTS_DIR, tree)
        if extra:
            ckptr.save(path / EXTRA_DIR, jax.tree.map(np.asarray, dict(extra)))
    (path / SETTINGS_FILE).write_text(json.dumps(dict(settings or {}), indent=2, sort_keys=True))


def load_weights(path: str | pathlib.Path) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by `save_weights`: returns (pytree of numpy arrays, settings)."""
    path = pathlib.Path(path).absolute()
    if not (path / WEIGHTS_DIR).is_dir():
        raise FileNotFoundError(
            f"{path}: not a mlgraph weights checkpoint (expected a '{WEIGHTS_DIR}/' folder "
            f"written by `python -m mlgraph.convert`)"
        )
    tree = _restore_item(path / WEIGHTS_DIR)
    settings_file = path / SETTINGS_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    return tree, settings


def load_extra(path: str | pathlib.Path) -> dict[str, Any]:
    """The per-example state a weights checkpoint carries (`save_weights(..., extra=)`, e.g.
    Scob's label estimator 'phi'), as numpy arrays; {} when it has none."""
    item = pathlib.Path(path).absolute() / EXTRA_DIR
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


BEST_METRIC = "best"  # the saved metric checkpoints are ranked by (config.best_metric's value)


def _best(metrics: Mapping[str, float]) -> float:
    # Workdirs written before `best` existed ranked by their EMA mAP under this key.
    return metrics[BEST_METRIC] if BEST_METRIC in metrics else metrics["ema_mAP"]


class TrainCheckpoints:
    """The checkpoints of a training workdir: train state and data iterator, saved together.

    Keeps the latest step (the resume point) and the evaluated step with the best metric
    (`config.best_metric`, saved as `best`).
    """

    def __init__(self, directory: str | pathlib.Path):
        policies = ocp.checkpoint_managers
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(
                    [
                        policies.LatestN(n=1),
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

    def latest_step(self) -> int | None:
        """The newest saved step, or None for a fresh workdir."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the best metric (`config.best_metric`; by default the EMA mAP)."""
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        """Every step still on disk."""
        return list(self.manager.all_steps())

    def save(
        self, step: int, state: Any, data_iterator, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Save `state` and the data iterator (anything with grain's `get_state`/`set_state`)
        at `step`; `metrics` holds `best` at evaluation steps and is None between them."""
        import grain

        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            metrics=None if metrics is None else dict(metrics),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """Restore the state at `step` onto the shardings of `abstract_state`.

        When `data_iterator` is given its position is restored in place too.
        """
        import grain

        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def read_state(self, step: int) -> Any:
        """The train state saved at `step` as host numpy arrays, without a target structure
        (for inspection and tests; training restores with `restore`)."""
        meta = self.manager.item_metadata(step)["state"]
        # Onto one local device: readable whatever devices (or hosts) wrote the checkpoint.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: (
                jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                if hasattr(m, "shape")
                else m
            ),
            meta,
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return jax.tree.map(np.asarray, restored["state"])

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

"""Evaluate a trained workdir or a converted checkpoint on the config's evaluation split.

    python -m mlgraph.evaluate --workdir DIR [--step N]
    python -m mlgraph.evaluate --checkpoint CONVERTED_DIR --config configs/NAME.py

Prints a table of mAP (and ML-GCN's non-interpolated mAP_ni), CP, CR, CF1, OP, OR, OF1 and
their top-3 forms (for the model and its EMA when evaluating a workdir) and writes it as JSON
(`DIR/eval_step<N>.json`, or `--output`).

A workdir's default checkpoint is the best step; when it cannot be read, the newest readable
one is evaluated instead, with a warning line (`--step N` picks one). Errors are one line on
stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mlgraph import (
    assets,
    checkpointing,
    cli,
    config_lib,
    divergence,
    metrics,
    paths,
    sharding,
    train,
)
from mlgraph.data import datasets
from mlgraph.errors import ConfigError, MlgraphError, WorkdirError, warn

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by EMA mAP).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted weights checkpoint.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (with --checkpoint).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON results.")

# (metric key, column header): mAP_ni is ML-GCN's non-interpolated mAP.
COLUMNS = [("mAP", "mAP"), ("mAP_noninterp", "mAP_ni")] + [(c, c) for c in metrics.THRESHOLDED]
COLUMNS += [(f"{c}_top3", f"{c}@3") for c in metrics.THRESHOLDED]
# The single-positive papers' mAP (scikit-learn's AP, 0 for a class without positives).
COLUMNS += [("spml_mAP", "mAP_sp")]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A text table: one row per model; both mAPs, the six thresholded metrics, their top-3."""
    header = ["model"] + [h for _, h in COLUMNS]
    lines = ["  ".join(f"{h:>7}" for h in header)]
    for name, m in rows.items():
        values = [m[k] for k, _ in COLUMNS]
        lines.append("  ".join([f"{name:>7}"] + [f"{v:7.2f}" for v in values]))
    return "\n".join(lines)


def _strip_count(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "images"}


def workdir_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir}: does not exist")
    if not path.exists():
        raise WorkdirError(f"--workdir {workdir}: no config.json; not a training workdir")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.init_from = ""  # the checkpoint holds the weights
    return config


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A training workdir's model as saved at one step.

    Attributes:
      config: the run's config (assets resolved to files).
      dataset: its opened data set.
      graphdef: the model's graph definition.
      state: the train state at `step` on this host's devices (replicated).
      step: the restored step.
      mesh: the device mesh the state lives on.
    """

    config: ml_collections.ConfigDict
    dataset: datasets.Dataset
    graphdef: Any
    state: dict
    step: int
    mesh: Any


def restore_workdir(workdir: str | pathlib.Path, step: int | None = None) -> RestoredRun:
    """The model of `workdir` saved at `step` (default: the best by `config.best_metric`,
    else the latest).

    Raises:
      WorkdirError: no config.json, no checkpoints, or a step that is not saved.
    """
    workdir = paths.path(workdir, "--workdir")
    config = workdir_config(workdir)
    ckpts = checkpointing.TrainCheckpoints(workdir / "checkpoints")
    ckpts.pick_step(step)  # no checkpoint at all, or a --step not saved: one line
    dataset = datasets.open_dataset(config.data)
    training = datasets.training_split(dataset, config.data)
    total = config_lib.total_steps(config, training.num_examples)
    mesh = sharding.make_mesh()
    repl = sharding.replicated(mesh)
    config = assets.resolve(config, dataset.class_names, dataset.directory)
    _, graphdef, _, state = train.init_train_state(config, dataset.num_classes, total, training)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    state, step = restore_step(ckpts, step, abstract, {divergence.HEALTH: state[divergence.HEALTH]})
    ckpts.close()
    return RestoredRun(config, dataset, graphdef, state, int(step), mesh)


def evaluate_workdir(workdir: str | pathlib.Path, step: int | None = None) -> dict:
    """Metrics of the model and the EMA saved at `step` (default: the best checkpoint) in
    `workdir`."""
    run = restore_workdir(workdir, step)
    config, dataset, state, mesh = run.config, run.dataset, run.state, run.mesh
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    predict = jax.jit(
        train.make_predict(run.graphdef, train.model_and_ema),
        in_shardings=(jax.tree.map(lambda _: repl, state), data_sh),
        out_shardings=(data_sh, data_sh),
    )
    source = dataset.sources[config.data.eval_split]
    result = train.evaluate_scores(predict, state, source, config, dataset.num_classes, mesh)
    divergence.check_scores(result["scores"], ["model", "EMA model"], f"step {step}")
    rows = {
        name: _strip_count(train.eval_metrics({**result, "scores": [s]}, prefixes=("",)))
        for name, s in zip(("model", "ema"), result["scores"], strict=True)
    }
    return {"step": run.step, "split": config.data.eval_split, "images": len(source), **rows}


def restore_step(ckpts, step: int | None, abstract, defaults) -> tuple[dict, int]:
    """(state, its step): `step`, or by default the best step, else the newest readable one
    (a warning line names each step that failed to read).

    Raises:
      WorkdirError: `step` (or every step) cannot be read.
    """
    if step is not None:
        order = [step]
    else:
        best = ckpts.best_step()  # None when no step was evaluated
        order = sorted(ckpts.all_steps(), key=lambda s: (s == best, s), reverse=True)
    found, state, failed = ckpts.restore_first(order, abstract, defaults=defaults)
    saved = ", ".join(map(str, sorted(ckpts.all_steps())))
    if found is None:
        reasons = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise WorkdirError(
            f"{ckpts.directory}: cannot read {reasons}; saved steps: {saved}"
            + ("; pick another with --step N" if step is not None else "")
        )
    for bad, reason in failed:
        warn(
            f"checkpoint step {bad} in {ckpts.directory} cannot be read ({reason}); evaluating "
            f"step {found} instead (saved steps: {saved}; pick one with --step N)"
        )
    return state, found


def evaluate_checkpoint(path: str, config: ml_collections.ConfigDict) -> dict:
    """Metrics of a converted weights checkpoint (a whole model) under `config`."""
    _, settings = checkpointing.load_weights(path)
    if settings.get("kind") != "model":
        raise ConfigError(
            f"--checkpoint {path}: holds a {settings.get('kind')} ('kind' in settings.json), "
            "not a whole model; use it as config.init_from for training instead"
        )
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = str(path)
    dataset = datasets.open_dataset(config.data)
    mesh = sharding.make_mesh()
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    config = assets.resolve(config, dataset.class_names, dataset.directory)
    _, graphdef, params, rest = train.create_model(config, dataset.num_classes)
    state = jax.device_put({"params": params, "rest": rest}, repl)
    predict = jax.jit(
        train.make_predict(graphdef, lambda s: ((s["params"], s["rest"]),)),
        in_shardings=(jax.tree.map(lambda _: repl, state), data_sh),
        out_shardings=(data_sh,),
    )
    source = dataset.sources[config.data.eval_split]
    result = train.evaluate_scores(predict, state, source, config, dataset.num_classes, mesh)
    divergence.check_scores(result["scores"], ["model"], f"--checkpoint {path}")
    row = _strip_count(train.eval_metrics(result, prefixes=("",)))
    return {
        "checkpoint": str(path),
        "split": config.data.eval_split,
        "images": len(source),
        "model": row,
    }


def main(argv: list[str]) -> None:
    """Entry point after flag parsing."""
    del argv
    cli.quiet_logs()
    try:
        if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
            raise ConfigError(
                "give exactly one of --workdir DIR or --checkpoint PATH --config FILE"
            )
        if _WORKDIR.value:
            results = evaluate_workdir(_WORKDIR.value, _STEP.value)
            default_out = paths.path(_WORKDIR.value) / f"eval_step{results['step']}.json"
        else:
            if _CONFIG.value is None:
                raise ConfigError("--checkpoint needs --config FILE (the model and data set)")
            results = evaluate_checkpoint(_CHECKPOINT.value, _CONFIG.value)
            default_out = paths.path(_CHECKPOINT.value) / "eval.json"
        out = paths.path(_OUTPUT.value, "--output") if _OUTPUT.value else default_out
    except (MlgraphError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = {k: v for k, v in results.items() if isinstance(v, dict)}
    print(f"{results['split']} split, {results['images']} images")
    print(format_table(rows))
    if jax.process_index() == 0:
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)

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
    models,
    paths,
    sharding,
    train,
)
from mlgraph.data import datasets
from mlgraph.errors import ConfigError, MlgraphError, WorkdirError, warn
from mlgraph.models.common import load_embeddings

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by EMA mAP).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted weights checkpoint.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (with --checkpoint).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON results.")
_LABELS = flags.DEFINE_string(
    "labels", None, "Open-vocabulary models: a file of label names (one a line) queried together."
)
_LABEL_EMBEDDINGS = flags.DEFINE_string(
    "label_embeddings", None, "With --labels: their embeddings, a .npy [K, E] (label_embed)."
)

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
    out = {"step": run.step, "split": config.data.eval_split, "images": len(source), **rows}
    # The method's label views (SigRL: ZSL over the unseen classes, GZSL over all).
    mod = models.method_module(config.model.name)
    return out | _views(mod, config, dataset, run.graphdef, state, result, mesh)


def evaluate_labels(
    workdir: str | pathlib.Path,
    labels_file: str,
    embeddings_file: str | None,
    step: int | None = None,
) -> dict:
    """Score the evaluation split with the label names of `labels_file` queried together (an
    open-vocabulary model's test-time label set), their embeddings from `embeddings_file`
    (.npy [K, E], e.g. `python -m mlgraph.data.label_embed --encoder clip ...`) or, for a run
    trained on MiniLM vectors, embedded with MiniLM. The zero-shot table is computed over the
    names that are classes of the data set (the others have no ground truth).

    Raises:
      ConfigError: a model that takes no label set, missing or mismatched embeddings.
    """
    from mlgraph.data import label_embed

    run = restore_workdir(workdir, step)
    config, dataset, state, mesh = run.config, run.dataset, run.state, run.mesh
    mod = models.method_module(config.model.name)
    if not hasattr(mod, "view_metrics"):
        raise ConfigError(
            f"--labels: a {config.model.name} model scores its fixed classes only; label sets "
            "are queried by open-vocabulary models (sigrl)"
        )
    try:
        names = label_embed.read_class_names(labels_file)
    except label_embed.LabelEmbedError as e:
        raise ConfigError(f"--labels {e}") from None
    width = int(state["rest"]["label_embeddings"].shape[1])
    if embeddings_file:
        table = load_embeddings(embeddings_file, len(names), width)
    elif config.model.get("embed_path", "").endswith(assets.MINILM_FILE):
        table = label_embed.embed_labels(names, "minilm")
    else:
        raise ConfigError(
            f"--labels {labels_file}: give --label_embeddings FILE.npy, the names embedded as "
            f"the training labels were ({config.model.get('embed_path')}), e.g. python -m "
            "mlgraph.data.label_embed --encoder clip --weights CLIP_TEXT --vocab "
            f"bpe_simple_vocab_16e6.txt.gz --classes {labels_file} --output FILE.npy"
        )
    if table.shape != (len(names), width):
        raise ConfigError(
            f"--label_embeddings: shape {table.shape}, expected ({len(names)}, {width})"
        )
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    live = lambda st: ((st["params"], st["rest"]),)  # noqa: E731
    predict = jax.jit(
        train.make_predict(run.graphdef, live, label_embeddings=jax.numpy.asarray(table)),
        in_shardings=(jax.tree.map(lambda _: repl, state), data_sh),
        out_shardings=(data_sh,),
    )
    source = dataset.sources[config.data.eval_split]
    result = train.evaluate_scores(predict, state, source, config, dataset.num_classes, mesh)
    index = {n: i for i, n in enumerate(dataset.class_names)}
    matched = [i for i, n in enumerate(names) if n in index]
    out = {
        "step": run.step,
        "split": config.data.eval_split,
        "images": len(source),
        "labels": names,
        "with_ground_truth": [names[i] for i in matched],
    }
    if matched:
        cols = [index[names[i]] for i in matched]
        scores = result["scores"][0][:, matched]
        out["views"] = {
            "labels": mod.view_metrics(
                scores, result["labels"][:, cols], result["label_mask"][:, cols]
            )
        }
    return out


def format_views(views: dict[str, dict[str, float]]) -> str:
    """A text table of the label views: one row per view (ZSL, GZSL, a --labels set)."""
    keys = list(next(iter(views.values())))
    header = ["view"] + [k.replace("_at", "@") for k in keys]
    lines = ["  ".join(f"{h:>7}" for h in header)]
    for name, m in views.items():
        lines.append("  ".join([f"{name.upper():>7}"] + [f"{m[k]:7.2f}" for k in keys]))
    return "\n".join(lines)


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
    settings = checkpointing.load_weights_settings(path)
    if settings.get("kind") != "model":
        raise ConfigError(
            f"--checkpoint {path}: holds a {settings.get('kind')} ('kind' in settings.json), "
            "not a whole model; use it as config.init_from for training instead"
        )
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = str(path)
    # As training: the method's loss defaults under config.loss (init_extra reads them).
    config.loss = models.loss_settings(config)
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
    out = {
        "checkpoint": str(path),
        "split": config.data.eval_split,
        "images": len(source),
        "model": row,
    }
    mod = models.method_module(config.model.name)
    if hasattr(mod, "eval_views"):
        # The views' label sets come from the method's state for the config's training split.
        extra = mod.init_extra(config, datasets.training_split(dataset, config.data))
        state = dict(state, extra=jax.device_put(extra, repl))
        out |= _views(mod, config, dataset, graphdef, state, result, mesh)
    return out


def _views(mod, config, dataset, graphdef, state, result, mesh) -> dict:
    """The method's label views of the live model ('views', 'unseen_classes'), or {}."""
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    shardings = dict(
        in_shardings=(jax.tree.map(lambda _: repl, state), data_sh), out_shardings=(data_sh,)
    )
    live = lambda st: ((st["params"], st["rest"]),)  # noqa: E731
    views = train.eval_views(mod, config, state, graphdef, live, **shardings)
    if not views:
        return {}
    source = dataset.sources[config.data.eval_split]
    found = train.view_metrics(
        mod, views, {**result, "scores": result["scores"][:1]}, state, source, config,
        dataset.num_classes, mesh, ("",),
    )  # fmt: skip
    out = {
        "views": {
            v.name: {k[len(v.name) + 1 :]: x for k, x in found.items() if k.startswith(v.name)}
            for v in views
        }
    }
    unseen = next((v.ids for v in views if v.ids is not None), None)
    if unseen is not None:
        out["unseen_classes"] = [dataset.class_names[i] for i in unseen]
    return out


def main(argv: list[str]) -> None:
    """Entry point after flag parsing."""
    del argv
    cli.quiet_logs()
    try:
        if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
            raise ConfigError(
                "give exactly one of --workdir DIR or --checkpoint PATH --config FILE"
            )
        if _LABELS.value and not _WORKDIR.value:
            raise ConfigError("--labels FILE scores a training workdir: give --workdir DIR")
        if _WORKDIR.value and _LABELS.value:
            results = evaluate_labels(
                _WORKDIR.value, _LABELS.value, _LABEL_EMBEDDINGS.value, _STEP.value
            )
            default_out = paths.path(_WORKDIR.value) / f"eval_step{results['step']}_labels.json"
        elif _WORKDIR.value:
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
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and k != "views"}
    print(f"{results['split']} split, {results['images']} images")
    if rows:
        print(format_table(rows))
    if "unseen_classes" in results:
        print(f"unseen classes ({len(results['unseen_classes'])}): "
              f"{', '.join(results['unseen_classes'][:12])}"
              f"{', ...' if len(results['unseen_classes']) > 12 else ''}")  # fmt: skip
    if "labels" in results:
        matched = results["with_ground_truth"]
        print(f"--labels: {len(results['labels'])} labels queried together, {len(matched)} with "
              f"ground truth in {results['split']}")  # fmt: skip
    if results.get("views"):
        print(format_views(results["views"]))
    if jax.process_index() == 0:
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)

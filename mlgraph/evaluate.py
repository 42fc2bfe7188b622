"""Evaluate a trained workdir or a converted checkpoint on the config's evaluation split.

    python -m mlgraph.evaluate --workdir DIR [--step N]
    python -m mlgraph.evaluate --checkpoint CONVERTED_DIR --config configs/NAME.py

Prints a table of mAP (and ML-GCN's non-interpolated mAP_ni), CP, CR, CF1, OP, OR, OF1 and
their top-3 forms (for the model and its EMA when evaluating a workdir) and writes it as JSON
(`DIR/eval_step<N>.json`, or `--output`); where that cannot be written (a read-only or full
disk), one line after the table names `--output`.

A workdir's step follows `mlgraph.workdir`'s policy: the best step, else the newest; one that
cannot be read is named in a warning line and the next newest readable one is evaluated
(`--step N` picks one exactly). Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mlgraph import assets, checkpointing, cli, evaluation, models, paths, sharding, train_state
from mlgraph.data import datasets
from mlgraph.errors import ConfigError, MlgraphError
from mlgraph.workdir import Run, open_run

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by EMA mAP).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted weights checkpoint.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (with --checkpoint).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON results.")
_LABELS = flags.DEFINE_string(
    "labels", None, "Open-vocabulary models: a file of label names (one a line) queried together."
)
_LABEL_EMBEDDINGS = flags.DEFINE_string(
    "label_embeddings", None, "With --labels: their embeddings, a .npy [K, E] (mlgraph.labels)."
)


def _rows(found: dict[str, float], prefixes: dict[str, str]) -> dict[str, dict[str, float]]:
    """{row name: {metric: value}} of the metrics `found` under each row's prefix."""
    return {
        row: {k[len(p) :]: v for k, v in found.items() if k.startswith(p) and k != f"{p}images"}
        for row, p in prefixes.items()
    }


def _views(scorer: evaluation.Scorer, state, source, result, class_names) -> dict:
    """The method's label views of the live model ('views', 'unseen_classes'), or {}; the
    evaluation table's rows hold the standard metrics only."""
    if not scorer.views:
        return {}
    live = {**result, "scores": result["scores"][:1]}
    found = scorer.view_metrics(state, source, live, ("",))
    out = {
        "views": {
            v.name: {k[len(v.name) + 1 :]: x for k, x in found.items() if k.startswith(v.name)}
            for v in scorer.views
        }
    }
    unseen = next((v.ids for v in scorer.views if v.ids is not None), None)
    if unseen is not None:
        out["unseen_classes"] = [class_names[i] for i in unseen]
    return out


def evaluate_workdir(workdir: str | pathlib.Path, step: int | None = None) -> dict:
    """Metrics of the model and the EMA saved at `step` (default: the best checkpoint, by
    `mlgraph.workdir`'s step policy) in `workdir`."""
    return score_workdir(workdir, step)[0]


def score_workdir(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, dict, Run]:
    """(`evaluate_workdir`'s metrics, the scores behind them, the opened run): the scores are
    `evaluation.Scorer.evaluate`'s result (`scores` of the model and of the EMA [N, C],
    `labels`, `label_mask`), one row per example of the evaluation split, in the split's order
    on one process (`mlgraph.viz.report` reads the examples back by their row)."""
    run = open_run(workdir, step)
    config, dataset = run.config, run.dataset
    mod = models.method_module(config.model.name)
    scorer = evaluation.Scorer(mod, config, run.graphdef, run.mesh, run.state, dataset.num_classes)
    source = dataset.sources[config.data.eval_split]
    prefixes = {"model": "model/", "ema": "ema/"}
    what = f"step {run.step}"
    result, found = scorer.evaluate(run.state, source, tuple(prefixes.values()), what, views=False)
    out = {"step": run.step, "split": config.data.eval_split, "images": len(source)}
    out |= _rows(found, prefixes)
    # The method's label views (SigRL: ZSL over the unseen classes, GZSL over all).
    return out | _views(scorer, run.state, source, result, dataset.class_names), result, run


def evaluate_labels(
    workdir: str | pathlib.Path,
    labels_file: str,
    embeddings_file: str | None,
    step: int | None = None,
) -> dict:
    """Score the evaluation split with the label names of `labels_file` queried together (an
    open-vocabulary model's test-time label set), their embeddings from `embeddings_file`
    (.npy [K, E], e.g. `python -m mlgraph.labels --encoder clip ...`) or, for a run
    trained on MiniLM vectors, embedded with MiniLM. The zero-shot table is computed over the
    names that are classes of the data set (the others have no ground truth).

    Raises:
      ConfigError: a model that takes no label set, missing or mismatched embeddings.
    """
    run = open_run(workdir, step)
    config, dataset = run.config, run.dataset
    mod = models.method_module(config.model.name)
    if not hasattr(mod, "view_metrics"):
        raise ConfigError(
            f"--labels: a {config.model.name} model scores its fixed classes only; label sets "
            "are queried by open-vocabulary models (sigrl)"
        )
    names = _label_names(labels_file)
    table = _label_table(config, names, embeddings_file, labels_file, run.state)
    scorer = evaluation.Scorer(
        mod, config, run.graphdef, run.mesh, run.state, dataset.num_classes,
        evaluation.live, label_embeddings=jax.numpy.asarray(table),
    )  # fmt: skip
    source = dataset.sources[config.data.eval_split]
    result = scorer.scores(run.state, source)
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


def _label_names(labels_file: str) -> list[str]:
    """The label names of a `--labels` file, one a line."""
    from mlgraph.labels import encoders

    try:
        return encoders.read_class_names(labels_file)
    except encoders.LabelEmbedError as e:
        raise ConfigError(f"--labels {e}") from None


def _label_table(config, names, embeddings_file, labels_file, state) -> np.ndarray:
    """The embeddings [K, E] of the `--labels` names (`assets.query_embeddings`)."""
    width = int(state["rest"]["label_embeddings"].shape[1])
    return assets.query_embeddings(
        config,
        names,
        width,
        embeddings_file,
        asked=f"--labels {labels_file}",
        names_file=labels_file,
    )


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
    config = assets.resolve(config, dataset.class_names, dataset.directory)
    mod, graphdef, params, rest = train_state.create_model(config, dataset.num_classes)
    state = {"params": params, "rest": rest}
    if hasattr(mod, "eval_views"):
        # The views' label sets come from the method's state for the config's training split.
        state["extra"] = mod.init_extra(config, datasets.training_split(dataset, config.data))
    state = jax.device_put(state, sharding.replicated(mesh))
    scorer = evaluation.Scorer(
        mod, config, graphdef, mesh, state, dataset.num_classes, evaluation.live
    )
    source = dataset.sources[config.data.eval_split]
    what = f"--checkpoint {path}"
    result, found = scorer.evaluate(state, source, ("model/",), what, views=False)
    out = {"checkpoint": str(path), "split": config.data.eval_split, "images": len(source)}
    out |= _rows(found, {"model": "model/"})
    return out | _views(scorer, state, source, result, dataset.class_names)


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
        print(evaluation.format_table(rows))
    if "unseen_classes" in results:
        print(f"unseen classes ({len(results['unseen_classes'])}): "
              f"{', '.join(results['unseen_classes'][:12])}"
              f"{', ...' if len(results['unseen_classes']) > 12 else ''}")  # fmt: skip
    if "labels" in results:
        matched = results["with_ground_truth"]
        print(f"--labels: {len(results['labels'])} labels queried together, {len(matched)} with "
              f"ground truth in {results['split']}")  # fmt: skip
    if results.get("views"):
        print(evaluation.format_views(results["views"]))
    if jax.process_index() == 0:
        _write_results(out, json.dumps(results, indent=2))
        print(f"wrote {out}")


def _write_results(out, text: str) -> None:
    """Write the JSON results to `out` (replaced whole: a write that fails leaves what was
    there); a fault (a read-only or full disk) is one line on stderr and exit status 2, after
    the table the user already has."""
    try:
        then = "or write the results elsewhere with --output FILE"
        with paths.faults_as_errors(out, needed=len(text.encode()), then=then):
            paths.replace_text(out, text)
    except MlgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_config_flags)

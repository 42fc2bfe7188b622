"""Scoring a data split with a train state's models, and the metric tables.

A train state holds two models: the live one (`params`, `rest`) and its EMA (`ema`). A
`Scorer` jits the forward pass of the ones it is asked for (`live`, `model_and_ema`) for the
state's layout on the device mesh, scores every example of a split once (padding masked), and
computes the method's label views (SigRL's ZSL/GZSL: a forward pass per queried label set).
Training evaluates with it, and so do `mlgraph.evaluate`, the methods' epoch hooks and
`mlgraph.bench`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import divergence, metrics, models, sharding
from mlgraph.data import pipeline
from mlgraph.errors import ConfigError

# Names of the models a state holds, in the order `model_and_ema` gives them (for messages).
MODEL_NAMES = ("model", "EMA model")


def live(state: dict) -> tuple:
    """The (params, rest) pair of the live model."""
    return ((state["params"], state["rest"]),)


def model_and_ema(state: dict) -> tuple:
    """The (params, rest) pairs of the live model and of its EMA."""
    return ((state["params"], state["rest"]), (state["ema"]["params"], state["ema"]["rest"]))


def make_predict(graphdef: nnx.GraphDef, pairs_of: Callable, **call_kwargs) -> Callable:
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


def evaluate_scores(predict, state, source, config, num_classes, mesh) -> dict[str, Any]:
    """Scores of each model `predict` returns over every example of `source` (padding masked).

    Returns {"scores": [model_0 scores, model_1 scores, ...], "labels": [N, C],
    "label_mask": [N, C] (False: the pair counts in no metric)}.
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


def eval_metrics(result: dict, prefixes: Sequence[str] = ("eval/", "eval/ema_")) -> dict:
    """`<prefix><metric>` for each model's scores in `result` (one prefix each), in percent,
    and `<first prefix>images`, the number of images scored."""
    out = {f"{prefixes[0]}images": float(len(result["labels"]))}
    mask = result.get("label_mask")
    for prefix, scores in zip(prefixes, result["scores"], strict=True):
        for name, value in metrics.compute_all(scores, result["labels"] > 0.5, mask).items():
            out[prefix + name] = value
    return out


@dataclasses.dataclass(frozen=True)
class EvalView:
    """A label set that evaluation scores with a forward pass of its own (a method's
    `eval_views`: SigRL's ZSL over the unseen classes, GZSL over all of them).

    Attributes:
      name: the metric prefix (`eval/<name>_<metric>`).
      ids: class positions, or None for every class (the split's own scores are reused).
      predict: the jitted predict over `ids` (None with `ids` None).
    """

    name: str
    ids: np.ndarray | None
    predict: Any


class Scorer:
    """Scores splits with the models `pairs_of` picks from train states laid out like
    `state` on `mesh` (placed as `state` is: replicated, or the training layout of
    `sharding.state_shardings`; batches sharded on the mesh's data axis).

    Args:
      mod: the method module (its `eval_views` and `view_metrics`, if any).
      config: the run's config (evaluation transform, batch size).
      graphdef: the model's graph definition.
      mesh: the device mesh.
      state: a state of the layout to score (its `extra` gives the views' label sets).
      num_classes: C.
      pairs_of: `live` or `model_and_ema`.
      call_kwargs: further arguments of the model's call (e.g. `label_embeddings`).
    """

    def __init__(
        self,
        mod: Any,
        config: ml_collections.ConfigDict,
        graphdef: nnx.GraphDef,
        mesh: Any,
        state: dict,
        num_classes: int,
        pairs_of: Callable = model_and_ema,
        **call_kwargs,
    ):
        self.mod, self.config, self.mesh, self.num_classes = mod, config, mesh, num_classes
        self.num_models = len(pairs_of(state))
        data_sh = sharding.batch_sharded(mesh)
        shardings = dict(
            in_shardings=(sharding.shardings_of(state), data_sh),
            out_shardings=(data_sh,) * self.num_models,
        )
        self.predict = jax.jit(make_predict(graphdef, pairs_of, **call_kwargs), **shardings)
        views = getattr(mod, "eval_views", lambda c, e: {})(config, state.get("extra", {}))
        self.views = []
        for name, ids in views.items():
            fn = None
            if ids is not None:
                ids = np.asarray(ids)
                per_view = make_predict(graphdef, pairs_of, label_ids=jnp.asarray(ids))
                fn = jax.jit(per_view, **shardings)
            self.views.append(EvalView(name, ids, fn))

    def scores(self, state: dict, source: Any) -> dict[str, Any]:
        """`evaluate_scores` of every example of `source`."""
        return evaluate_scores(
            self.predict, state, source, self.config, self.num_classes, self.mesh
        )

    def view_metrics(
        self, state: dict, source: Any, result: dict, prefixes: Sequence[str]
    ) -> dict[str, float]:
        """`<prefix><view>_<metric>` of each view by the method's `view_metrics(scores,
        labels, mask)`; `result` holds `scores`' output over every class (reused by the views
        whose `ids` are None). A model not scored reports the first one's figures."""
        out = {}
        for view in self.views:
            labels, mask, scores = result["labels"], result["label_mask"], result["scores"]
            if view.ids is not None:
                scores = evaluate_scores(
                    view.predict, state, source, self.config, self.num_classes, self.mesh
                )["scores"]
                labels, mask = labels[:, view.ids], mask[:, view.ids]
            scores = (list(scores) * len(prefixes))[: len(prefixes)]
            for prefix, s in zip(prefixes, scores, strict=True):
                for name, value in self.mod.view_metrics(s, labels, mask).items():
                    out[f"{prefix}{view.name}_{name}"] = value
        return out

    def evaluate(
        self, state: dict, source: Any, prefixes: Sequence[str], what: str, views: bool = True
    ) -> tuple[dict, dict[str, float]]:
        """Score `source` and compute its metrics: (the scores, `<prefix><metric>` for the
        standard metrics and, with `views`, the views', one prefix per model; with fewer models
        scored than prefixes, as with an EMA of decay 0, which is the model bit for bit, the
        first one's figures stand for the rest).

        Raises:
          DivergenceError: non-finite scores (`what` names the evaluation).
        """
        result = self.scores(state, source)
        divergence.check_scores(result["scores"], list(MODEL_NAMES[: self.num_models]), what)
        scores = (result["scores"] * len(prefixes))[: len(prefixes)]
        found = eval_metrics({**result, "scores": scores}, prefixes)
        if views:
            found |= self.view_metrics(state, source, result, prefixes)
        return result, found


def summary_lines(found: dict[str, float], prefix: str, step: int, views: Sequence[str]) -> list:
    """The log lines of an evaluation under `prefix` ('eval/', 'val/') at `step`: mAP of the
    model and the EMA with CF1/OF1, then one line per view."""
    name = prefix[:-1]
    lines = [
        f"{name} step {step}: mAP {found[prefix + 'mAP']:.2f} "
        f"EMA mAP {found[prefix + 'ema_mAP']:.2f} "
        f"(CF1 {found[prefix + 'CF1']:.2f} OF1 {found[prefix + 'OF1']:.2f})"
    ]
    for view in views:
        head = f"{prefix}{view}_"
        shown = " ".join(
            f"{k[len(head) :]} {v:.2f}" for k, v in found.items() if k.startswith(head)
        )
        lines.append(f"{name} step {step} {view.upper()}: {shown}")
    return lines


def check_best_metric(config: ml_collections.ConfigDict, prefixes: Sequence[str]) -> None:
    """`config.best_metric` must name a metric an evaluation under `prefixes` logs.

    Raises:
      ConfigError: another prefix (or 'val/' without a held-out split) or metric name.
    """
    prefix, _, name = config.best_metric.rpartition("/")
    names = set(metrics.metric_names())
    mod = models.method_module(config.model.name)
    if hasattr(mod, "view_metric_names"):
        names |= set(mod.view_metric_names())
    names |= {f"ema_{n}" for n in names}
    if f"{prefix}/" not in prefixes or name not in names:
        raise ConfigError(
            f"config.best_metric={config.best_metric!r}: expected one of "
            f"{', '.join(p + 'ema_mAP' for p in prefixes)} or another logged metric "
            f"({', '.join(sorted(names))}) under {' or '.join(prefixes)}"
            + ("" if "val/" in prefixes else "; 'val/' needs config.data.val_fraction > 0")
        )


# (metric key, column header): mAP_ni is ML-GCN's non-interpolated mAP; mAP_sp the
# single-positive papers' (scikit-learn's AP, 0 for a class without positives).
COLUMNS = [("mAP", "mAP"), ("mAP_noninterp", "mAP_ni")] + [(c, c) for c in metrics.THRESHOLDED]
COLUMNS += [(f"{c}_top3", f"{c}@3") for c in metrics.THRESHOLDED]
COLUMNS += [("spml_mAP", "mAP_sp")]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A text table: one row per model; both mAPs, the six thresholded metrics, their top-3."""
    header = ["model"] + [h for _, h in COLUMNS]
    lines = ["  ".join(f"{h:>7}" for h in header)]
    for name, m in rows.items():
        values = [m[k] for k, _ in COLUMNS]
        lines.append("  ".join([f"{name:>7}"] + [f"{v:7.2f}" for v in values]))
    return "\n".join(lines)


def format_views(views: dict[str, dict[str, float]]) -> str:
    """A text table of the label views: one row per view (ZSL, GZSL, a --labels set)."""
    keys = list(next(iter(views.values())))
    header = ["view"] + [k.replace("_at", "@") for k in keys]
    lines = ["  ".join(f"{h:>7}" for h in header)]
    for name, m in views.items():
        lines.append("  ".join([f"{name.upper():>7}"] + [f"{m[k]:7.2f}" for k in keys]))
    return "\n".join(lines)

"""Starting a model from `config.init_from`: a weights checkpoint written by `mlgraph.convert`
(a backbone or a whole model, checked against `config.model`), or a training workdir whose
model (and per-example state) a new run continues, such as the second phase of the SPML
linear-init protocol."""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import checkpointing, paths, workdir
from mlgraph.errors import ConfigError


def is_workdir(path: str) -> bool:
    """Whether `path` is a training workdir (a `config.init_from` that continues a run's
    model, such as the second phase of the SPML linear-init protocol)."""
    return workdir.is_run(paths.path(path, "config.init_from"))


def read_workdir_state(path: str, model_cfg: ml_collections.ConfigDict) -> dict:
    """The live model and per-example state (`params`, `rest`, `extra`) of training workdir
    `path` at the step `mlgraph.workdir`'s policy picks (the best, else the newest readable),
    as numpy.

    Fields that change no weight (e.g. `frozen_bn`, frozen in a linear phase) may differ; a
    weight of another shape is an error when it is filled in (`checkpointing.fill_from`).

    Raises:
      ConfigError: the workdir trained another method.
      WorkdirError: it has no readable checkpoint.
    """
    saved = workdir.read_config(path, "config.init_from").get("model", {})
    if saved.get("name") != model_cfg.name:
        raise ConfigError(
            f"config.init_from={path}: the workdir trained a {saved.get('name')!r} model, but "
            f"config.model.name={model_cfg.name!r}"
        )
    state, _ = workdir.read_state(path, parts=("params", "rest", "extra"), flag="config.init_from")
    return jax.tree.map(np.asarray, state)


def carry_extra(extra: dict, saved: dict) -> dict:
    """The method's per-example state carried over from an earlier run: each entry of
    `extra` that `saved` holds (optimizer states, named `*_opt`, start afresh).

    Raises:
      ConfigError: an entry of another shape (the earlier run trained on other examples).
    """
    out = dict(extra)
    for name, value in extra.items():
        if not name.endswith("_opt") and name in saved:
            out[name] = checkpointing.fill_from(
                value, saved[name], f"the workdir's extra state {name!r}"
            )
    return out


def check_weights_settings(settings: dict, model_cfg: ml_collections.ConfigDict, path: str) -> None:
    """A whole-model weights checkpoint must have been converted for the model `config.model`
    describes: same method, and the same value of every field in its settings' `model` (the
    converters record there exactly the fields the weights or the official config fix; fields
    they only assumed are listed under `assumed` and not compared), since some (attention
    heads, GGNN steps, the extra pool) change the outputs but no shape.

    Raises:
      ConfigError: naming each differing field with both values.
    """
    saved = settings.get("model", {})
    if saved.get("name", model_cfg.name) != model_cfg.name:
        raise ConfigError(
            f"config.init_from={path}: holds a '{saved['name']}' model, but "
            f"config.model.name='{model_cfg.name}'"
        )
    assumed = set(settings.get("assumed", ()))
    diffs = [
        f"{field} (checkpoint {_plain(value)!r}, config {_plain(model_cfg.get(field))!r})"
        for field, value in saved.items()
        if field not in assumed | {"name"} and _plain(model_cfg.get(field)) != _plain(value)
    ]
    if diffs:
        raise ConfigError(
            f"config.init_from={path}: the checkpoint's model differs from config.model in "
            f"{'; '.join(diffs)}; set these config.model fields as in its settings.json"
        )


def _plain(value: Any) -> Any:
    """A config value as plain JSON data (ConfigDicts and tuples become dicts and lists)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value))


def init_from_weights(model: nnx.Module, path: str) -> None:
    """Fill `model` (or its backbone) from a weights checkpoint written by mlgraph.convert.

    Whether a whole-model checkpoint fits the config is `check_weights_settings`, which
    `train_state.create_model` runs before it builds the model.
    """
    tree, settings = checkpointing.load_weights(path)
    kind = settings.get("kind", "model")
    target = model.backbone if kind == "backbone" else model
    state = nnx.state(target)
    try:
        nnx.replace_by_pure_dict(state, tree)
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"config.init_from={path}: its {kind} weights do not fit this model ({e})"
        ) from None
    nnx.update(target, state)
    # A model that keeps derived copies of loaded weights (SigRL's frozen teacher) refreshes them.
    if hasattr(model, "weights_loaded"):
        model.weights_loaded()

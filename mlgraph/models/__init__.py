"""The method protocol: what a method module under `mlgraph/models/` defines.

A method is one module `mlgraph/models/<name>.py`, found by `config.model.name` (a name with a
dot is imported as it is: a method kept outside the package, such as the tests' toy). The training
loop (`mlgraph.train`, `train_state`, `train_step`), `evaluation`, `bench`, the converters and
the tests reach it only through the names below.

Must define:

* `Model`: the `nnx.Module` class, built as
  `Model(num_classes=C, image_size=S, dtype=D, rngs=R, **fields)` with `fields` = `config.model`
  without `name`. The constructor's keyword arguments after those four *are* the method's
  `config.model` fields and their defaults are the defaults (`field_defaults`); a misspelt field
  is a `ConfigError` listing the valid ones (`build`). A constructor that also takes
  `num_train_examples` receives the size of the training split, for per-example state such as
  ROLE's label matrix. `Model.__call__(images, *, labels=None, train=False, rngs=None)` returns
  a dict with at least `'logits'` [B, C] float32.
* `loss_fn(outputs, batch, config) -> (loss, {name: scalar})`: the training objective from the
  model's outputs and the batch (`image`, `labels`, and `index`, the example's position in the
  training split); loss settings live in `config.loss`, never in `config.model`.

May define:

* `Loss`: a frozen dataclass whose fields (each with a default and a comment) *are* the
  method's `config.loss` fields and their defaults (`loss_defaults`, `loss_config`); the
  training loop fills in the defaults a config leaves out and refuses a field `Loss` lacks
  (`loss_settings`). Shared field sets live in `mlgraph.losses` (`ClassificationLoss`,
  `SinglePositiveLoss`) for a method to use or subclass; without `Loss`, a method has
  `losses.ClassificationLoss`'s fields.
* `ema_live_paths(config) -> tuple[str, ...]`: state paths (regexes over `params/...`,
  `rest/...`) the EMA model takes live instead of averaging (SALGL's counts with comat_ema off).
* `make_optimizer(config, total_steps, params)`: an object with `init(params)` for the
  optimizer state `state["opt"]` (default: `mlgraph.optim.make_optimizer`, one optax chain).
* `make_train_step(ctx: mlgraph.train_step.StepContext)`: its own `(state, batch) -> (state,
  metrics)` step, jitted by the loop (several optimizer updates, parameter groups that skip a
  step); default `mlgraph.train_step.default_train_step`.
* `init_extra(config, training: mlgraph.data.datasets.TrainingSplit)`: a pytree of arrays
  kept as `state["extra"]`, checkpointed and restored with the rest of the state (per-example
  label matrices `[N_train, C]` indexed by `batch["index"]`, such as the observed single
  positives `training.observed`; prototype banks).
* `epoch_end(ctx: mlgraph.train.HookContext, state, epoch) -> state`: a host hook run after
  each finished training epoch (pseudo-labels, prototype banks), before the checkpoint of that
  step, so a resumed run sees exactly what an uninterrupted one does.
* `eval_views(config, extra) -> {name: class positions or None}`: label sets that evaluation
  scores each with a forward pass of its own, `model(images, label_ids=ids)` (None: every
  class, the loop's own scores), for models whose scores depend on the queried set (SigRL:
  'zsl' over the unseen classes, 'gzsl' over all); with `view_metrics(scores, labels, mask)
  -> {metric: value}` and `view_metric_names()` (every `<view>_<metric>`), logged as
  `eval/<view>_<metric>` and printed by `mlgraph.evaluate` (whose `--labels FILE` queries any
  list of names through `model(images, label_embeddings=E)`).

`Model` may define `weights_loaded()`, called after `config.init_from` fills in weights, for
copies the model derives from them (SigRL's frozen teacher from the CLIP tower).
A method whose predictions come from attention over image positions exposes it from the
forward pass that scores: in its outputs ('att_weights' [B, C, N]: SSGRL, SALGL) or, with
`Model.__call__(..., sow_weights=True)`, as `nnx.Intermediate`s (Query2Label's decoder
cross-attention, SigRL's SDA weights); `mlgraph.viz.attention` draws them.

Models never import config helpers (`mlgraph.config_lib`, `mlgraph.recipes`): recipes import
models, not the reverse.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from mlgraph import losses
from mlgraph.errors import ConfigError

# The `config.loss` fields of a method that defines no `Loss`.
DEFAULT_LOSS = losses.ClassificationLoss
# Constructor arguments the builder supplies; every other keyword argument is a config field.
BUILDER_ARGS = ("num_classes", "image_size", "dtype", "param_dtype", "rngs", "num_train_examples")
REQUIRED = ("Model", "loss_fn")
OPTIONAL = (
    "ema_live_paths",
    "make_optimizer",
    "make_train_step",
    "init_extra",
    "epoch_end",
    "eval_views",
    "view_metrics",
    "view_metric_names",
)


def method_module(name: str) -> types.ModuleType:
    """The method module `mlgraph.models.<name>`, checked against the protocol.

    Raises:
      ConfigError: no such module, or one without `Model` and `loss_fn`.
    """
    module = name if "." in name else f"{__name__}.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            where = module if "." in name else f"mlgraph/models/{name}.py"
            raise ConfigError(f"config.model.name={name!r}: no module {where}") from None
        raise
    missing = [attr for attr in REQUIRED if not hasattr(mod, attr)]
    if missing:
        raise ConfigError(
            f"config.model.name={name!r}: mlgraph/models/{name}.py is not a method module "
            f"(it lacks {', '.join(missing)}; see the protocol in mlgraph/models/__init__.py)"
        )
    return mod


def _parameters(model_cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(model_cls.__init__).parameters
    return {
        n: p
        for n, p in params.items()
        if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def field_defaults(name: str) -> dict[str, Any]:
    """The `config.model` fields of method `name` with their defaults (its `Model`'s keyword
    arguments other than the builder's), plus `name`."""
    fields: dict[str, Any] = {"name": name}
    for arg, p in _parameters(method_module(name).Model).items():
        if arg in BUILDER_ARGS:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"mlgraph.models.{name}.Model: config field {arg!r} has no default")
        # Mapping defaults (an immutable empty `backbone_kwargs`) become plain dicts.
        fields[arg] = dict(p.default) if isinstance(p.default, Mapping) else p.default
    return fields


def takes_num_train_examples(name: str) -> bool:
    """Whether method `name`'s `Model` is built with the size of the training split (for
    per-example state such as ROLE's label matrix)."""
    return "num_train_examples" in _parameters(method_module(name).Model)


def _plain(value: Any) -> Any:
    """ConfigDict values as plain Python (dicts; lists as tuples) for a constructor."""
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, list):
        return tuple(value)
    return value


def build(
    model_cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    num_classes: int,
    image_size: int,
    dtype: Any = "float32",
    rngs: nnx.Rngs,
    num_train_examples: int | None = None,
) -> nnx.Module:
    """`Model(num_classes=..., image_size=..., dtype=..., rngs=..., **fields)` of the method
    `model_cfg['name']`; fields not given take the constructor's defaults.

    Raises:
      ConfigError: unknown method, or fields the method does not have (valid ones listed).
    """
    fields = {k: _plain(v) for k, v in dict(model_cfg).items()}
    name = fields.pop("name", None)
    if not name:
        raise ConfigError("config.model.name: missing; it names a module in mlgraph/models/")
    mod = method_module(name)
    params = _parameters(mod.Model)
    valid = sorted(n for n in params if n not in BUILDER_ARGS)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ConfigError(
            f"config.model: unknown {name} field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(valid)}"
        )
    kwargs = dict(num_classes=int(num_classes), image_size=int(image_size), rngs=rngs)
    kwargs["dtype"] = jnp.dtype(dtype or "float32")
    if "num_train_examples" in params:
        kwargs["num_train_examples"] = num_train_examples
    return mod.Model(**kwargs, **fields)


def create(
    config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    rngs: nnx.Rngs,
    num_train_examples: int | None = None,
) -> nnx.Module:
    """The model `config.model` describes, for `config.image_size` images in `config.dtype`."""
    return build(
        config.model,
        num_classes=num_classes,
        image_size=config.image_size,
        dtype=config.get("dtype") or "float32",
        rngs=rngs,
        num_train_examples=num_train_examples,
    )


# ---------------------------------------------------------------------------------------------
# config.loss: the method's `Loss` dataclass
# ---------------------------------------------------------------------------------------------
def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.model` of method `name`: every field of its `Model` with its default, and
    `overrides` applied (so every field can be overridden on the command line).

    Raises:
      ConfigError: for a field the method does not have (the valid ones are listed).
    """
    defaults = field_defaults(name)
    return _overridden(
        defaults,
        overrides,
        lambda unknown: (
            f"config.model: unknown {method_module(name).Model.__name__} field(s) {unknown}; "
            f"valid fields: {', '.join(sorted(k for k in defaults if k != 'name'))}"
        ),
    )


def _overridden(defaults: dict, overrides: dict, problem) -> ml_collections.ConfigDict:
    """`defaults` with `overrides` applied; a ConfigError of `problem(unknown names)` if an
    override names no default."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(problem(", ".join(unknown)))
    return ml_collections.ConfigDict(defaults | overrides)


def loss_defaults(name: str) -> dict[str, Any]:
    """The `config.loss` fields of method `name` with their defaults: those of its `Loss`
    dataclass (`DEFAULT_LOSS`'s for a method without one).

    Raises:
      ConfigError: unknown method.
      TypeError: a `Loss` that is not a dataclass, or a field of it without a default.
    """
    cls = getattr(method_module(name), "Loss", DEFAULT_LOSS)
    if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{name}: Loss must be a dataclass (the protocol in mlgraph.models)")
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = f.default_factory()
        else:
            raise TypeError(f"{name}: config.loss field {f.name!r} of Loss has no default")
    return fields


def loss_config(name: str, /, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.loss` of method `name`: every field of its `Loss` with its default, and
    `overrides` applied (so every field can be overridden on the command line). `name` is
    positional only: `name=` among the overrides is the loss's own, e.g.
    `loss_config("spml", name="role")`.

    Raises:
      ConfigError: unknown method, or fields its `Loss` does not have (valid ones listed).
    """
    defaults = loss_defaults(name)
    return _overridden(
        defaults,
        overrides,
        lambda unknown: (
            f"config.loss: unknown field(s) {unknown} of {name}'s loss; "
            f"valid fields: {', '.join(sorted(defaults))}"
        ),
    )


def loss_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The complete loss settings of `config`: its method's (`config.model.name`) `Loss`
    defaults, then the fields `config.loss` sets. A config that predates a field still runs
    with its default; a field the method does not read is refused instead of ignored.

    Raises:
      ConfigError: no method named, or a `config.loss` field its `Loss` does not have.
    """
    name = config.model.get("name") if config.get("model") is not None else None
    if not name:
        raise ConfigError("config.model.name: missing; it names a module in mlgraph/models/")
    given = config.get("loss") or {}
    if isinstance(given, ml_collections.ConfigDict):
        given = given.to_dict()
    return loss_config(name, **dict(given))

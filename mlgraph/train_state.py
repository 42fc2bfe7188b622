"""The train state: the model built from a config (and `config.init_from`), its optimizer,
and the state dict every training step takes and returns.

The model is an NNX module used functionally: `nnx.split` once into (graphdef, params, rest),
`nnx.merge` inside the jitted steps. `params` are the `nnx.Param`s (optimized); `rest` holds
batch statistics and buffers, updated by the forward pass in training mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mlgraph import checkpointing, divergence, init_from, models, optim
from mlgraph.data import datasets


def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    num_train_examples: int | None = None,
    earlier_run: dict | None = None,
    weights: tuple | None = None,
):
    """(the method's module, graphdef, params, rest) for `config`, from `config.init_from` if
    set (`earlier_run`: that training workdir's state, when the caller has read it already),
    or from `weights` = (params, rest) holding every variable (e.g. a converted model's).

    Initialisation runs under one `jax.jit`: eagerly, every new weight shape is its own
    compilation, which takes minutes for a ResNet-101 on a CPU host. With `weights` nothing is
    initialised (the model is built abstractly and filled).

    Raises:
      ValueError: both `weights` and `config.init_from`.
      ConfigError: `weights` without a variable of the model, or with another shape.
    """
    mod = models.method_module(config.model.name)
    if weights is not None and config.init_from:
        raise ValueError("create_model: weights given and config.init_from set; give one")
    if config.init_from and not init_from.is_workdir(config.init_from):
        # A weights checkpoint for another architecture is refused before the model is built
        # (minutes for a ResNet-101 on a CPU host).
        settings = checkpointing.load_weights_settings(config.init_from)
        if settings.get("kind", "model") == "model":
            init_from.check_weights_settings(settings, config.model, config.init_from)

    def create():
        return models.create(
            config,
            num_classes=num_classes,
            rngs=nnx.Rngs(config.seed),
            num_train_examples=num_train_examples,
        )

    graphdef, abstract_params, abstract_rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    if weights is not None:
        field = "create_model(weights=...)"
        params = checkpointing.fill_from(abstract_params, weights[0], "the params", field)
        rest = checkpointing.fill_from(abstract_rest, weights[1], "the state", field)
        return mod, graphdef, params, rest
    params, rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[1:])()
    if config.init_from and init_from.is_workdir(config.init_from):
        saved = earlier_run or init_from.read_workdir_state(config.init_from, config.model)
        params = checkpointing.fill_from(params, saved["params"], f"{config.init_from} params")
        rest = checkpointing.fill_from(rest, saved["rest"], f"{config.init_from} state")
    elif config.init_from:
        model = nnx.merge(graphdef, params, rest)
        init_from.init_from_weights(model, config.init_from)
        _, params, rest = nnx.split(model, nnx.Param, ...)
    return mod, graphdef, params, rest


def make_optimizer(mod, config: ml_collections.ConfigDict, total: int, params):
    """The method's optimizer (`make_optimizer` of its module) or `optim.make_optimizer` of
    `config.optimizer`."""
    if hasattr(mod, "make_optimizer"):
        return mod.make_optimizer(config, total, params)
    return optim.make_optimizer(config.optimizer, total, params, config.num_epochs)


def init_train_state(
    config: ml_collections.ConfigDict,
    num_classes: int,
    total: int,
    training: datasets.TrainingSplit | None = None,
    weights: tuple | None = None,
):
    """(method module, graphdef, optimizer, train state) for a fresh run on `training` (the
    training examples; needed by methods with per-example state), from `weights` = (params,
    rest) when given (`create_model`).

    The state is a dict: `params` (nnx.Param), `rest` (batch statistics, buffers), `opt` (the
    optimizer's state), `ema` (params and rest of the EMA model), `step`, `extra` (the
    method's own arrays from `init_extra`, e.g. per-example label matrices; {} if none) and
    `health` (the loop's finite check, `mlgraph.divergence`; a method's step never sees it).
    """
    num_train = None if training is None else training.num_examples
    # A training workdir as `init_from` is read once, for the weights and the method's state.
    earlier_run = None
    if config.init_from and init_from.is_workdir(config.init_from):
        earlier_run = init_from.read_workdir_state(config.init_from, config.model)
    mod, graphdef, params, rest = create_model(
        config, num_classes, num_train, earlier_run, weights=weights
    )
    tx = make_optimizer(mod, config, total, params)
    extra = {}
    if hasattr(mod, "init_extra"):
        if training is None:
            raise ValueError(f"{config.model.name}: init_extra needs the training split")
        extra = mod.init_extra(config, training)
        if earlier_run is not None:
            extra = init_from.carry_extra(extra, earlier_run["extra"])
    return mod, graphdef, tx, new_state(tx, params, rest, extra)


def new_state(tx, params, rest, extra: dict) -> dict:
    """The train state (`init_train_state`'s dict) of a run at step 0 from the model's `params`
    and `rest` and the method's `extra`, with a fresh optimizer state and the EMA a copy."""
    return {
        "params": params,
        "rest": rest,
        # Both under one jit each: eagerly, every variable shape compiles its own program.
        "opt": jax.jit(tx.init)(params),
        # A copy: the EMA must not share buffers with the live weights, which are donated
        # (a jit's outputs are new buffers).
        "ema": jax.jit(lambda t: jax.tree.map(jnp.copy, t))({"params": params, "rest": rest}),
        "step": jnp.zeros((), jnp.int32),
        "extra": jax.tree.map(jnp.asarray, extra),
        divergence.HEALTH: divergence.initial_health(),
    }


def abstract_train_state(
    config: ml_collections.ConfigDict,
    num_classes: int,
    total: int,
    training: datasets.TrainingSplit | None = None,
):
    """`init_train_state`'s (method module, graphdef, optimizer, train state) with the state as
    `jax.ShapeDtypeStruct`s: shapes and dtypes only, nothing initialised, and no weights read
    (`config.init_from` changes values, never shapes); for compiling a step ahead of time.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = ""
    mod = models.method_module(config.model.name)
    num_train = None if training is None else training.num_examples
    abstract = nnx.eval_shape(
        lambda: models.create(
            config, num_classes=num_classes, rngs=nnx.Rngs(0), num_train_examples=num_train
        )
    )
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tx = make_optimizer(mod, config, total, params)
    extra = {}
    if hasattr(mod, "init_extra"):
        if training is None:
            raise ValueError(f"{config.model.name}: init_extra needs the training split")
        extra = mod.init_extra(config, training)
    shape_of = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
    state = {
        "params": params,
        "rest": rest,
        "opt": jax.eval_shape(tx.init, params),
        "ema": {"params": params, "rest": rest},
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "extra": jax.tree.map(shape_of, extra),
        divergence.HEALTH: jax.eval_shape(divergence.initial_health),
    }
    return mod, graphdef, tx, state

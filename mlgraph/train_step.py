"""The training step: the method's loss and gradient, the optimizer update and the EMA,
inside the finite check of `mlgraph.divergence` (so every method's steps are checked).

A method module may make its own step from a `StepContext` (`make_train_step(ctx)`, the
protocol in `mlgraph.models`); `default_train_step` is the one optax update of the others.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mlgraph import divergence, optim, sharding


def ema_update(ema: Any, live: Any, decay: float, live_paths: tuple[str, ...]) -> Any:
    """ema <- decay * ema + (1 - decay) * live; entries matching `live_paths` are copied live."""
    patterns = [re.compile(p) for p in live_paths]

    def update(path, e, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if any(p.fullmatch(name) for p in patterns) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return decay * e + (1.0 - decay) * x

    return jax.tree_util.tree_map_with_path(update, ema, live)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a train step is made from (the argument of a method's `make_train_step`).

    Attributes:
      mod: the method module (its `loss_fn`).
      graphdef: the model's graph definition (`nnx.merge(graphdef, params, rest)`).
      tx: the optimizer (`optim.make_optimizer`, or the method's `make_optimizer`).
      config: the run's config.
      total_steps: the length of the run.
      ema_live: state paths the EMA takes live (the config's and the method's).
    """

    mod: Any
    graphdef: nnx.GraphDef
    tx: Any
    config: ml_collections.ConfigDict
    total_steps: int
    ema_live: tuple[str, ...]

    def loss_and_grads(
        self, params: Any, rest: Any, batch: dict, step: jax.Array, trainable: dict | None = None
    ):
        """The method's loss on `batch` and its gradient with respect to `params`.

        Forward in training mode (batch statistics and method buffers such as SALGL's
        co-occurrence counts update over the global batch), dropout keyed by `step`.
        `trainable`: further arrays outside the model that `loss_fn` reads as batch entries and
        that are differentiated too (e.g. the rows of ROLE's label matrix).

        Only the parameters `config.optimizer.frozen` does not match are differentiated: the
        frozen ones get zero gradients without a backward pass through them (a frozen backbone
        costs its forward only), which the optimizer then ignores as before.

        Returns:
          (loss, aux metrics, the updated non-parameter state `rest`, grads): grads of `params`,
          or the pair (grads of `params`, grads of `trainable`) when `trainable` is given.
        """
        dropout_key = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
        frozen, params = optim.split_frozen(params, self.config.optimizer)

        def loss_of(params, extra_inputs, rest):
            # `rest` is copied so that the forward's buffer updates belong to this trace.
            model = nnx.merge(self.graphdef, params, frozen, jax.tree.map(lambda x: x, rest))
            rngs = nnx.Rngs(dropout=dropout_key)
            out = model(batch["image"], labels=batch["labels"], train=True, rngs=rngs)
            with jax.named_scope("loss"):  # the parts of `mlgraph.bench --profile`'s table
                loss, aux = self.mod.loss_fn(out, batch | extra_inputs, self.config)
            return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

        grad_fn = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)
        (loss, (aux, rest)), (grads, extra_grads) = grad_fn(params, trainable or {}, rest)
        grads = nnx.merge_state(grads, jax.tree.map(jnp.zeros_like, frozen))
        return loss, aux, rest, (grads, extra_grads) if trainable is not None else grads

    def finish(self, state: dict, params: Any, rest: Any, opt: Any, **changes) -> dict:
        """The next state: new params, rest and optimizer state, the EMA updated from them,
        the step counted; `changes` replace other entries (e.g. `extra`)."""
        with jax.named_scope("ema"):
            ema = ema_update(
                state["ema"], {"params": params, "rest": rest}, self.config.ema.decay, self.ema_live
            )
        new = dict(state, params=params, rest=rest, opt=opt, ema=ema, step=state["step"] + 1)
        return new | changes


def default_train_step(ctx: StepContext):
    """The (un-jitted) step: (state, batch) -> (new state, scalar metrics): the method's loss
    and its gradient, one optax update, the EMA of every state entry."""
    lr_fn = optim.learning_rate_fn(ctx.config.optimizer, ctx.total_steps, ctx.config.num_epochs)

    def train_step(state, batch):
        loss, aux, rest, grads = ctx.loss_and_grads(
            state["params"], state["rest"], batch, state["step"]
        )
        with jax.named_scope("optimizer"):
            updates, opt = ctx.tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        return ctx.finish(state, params, rest, opt), {
            "loss": loss,
            "lr": lr_fn(state["step"]),
            **aux,
        }

    return train_step


def make_train_step(mod, graphdef: nnx.GraphDef, tx, config: ml_collections.ConfigDict, total: int):
    """The method's train step (`make_train_step` of its module) or `default_train_step`, inside
    the finite check of `divergence.guard_step` (so every method's steps are checked)."""
    # State the EMA model takes live instead of averaging: the config's, plus the method's own
    # (e.g. SALGL's co-occurrence counts when comat_ema is off).
    method_live = getattr(mod, "ema_live_paths", lambda config: ())(config)
    ctx = StepContext(
        mod=mod,
        graphdef=graphdef,
        tx=tx,
        config=config,
        total_steps=total,
        ema_live=tuple(config.ema.live) + tuple(method_live),
    )
    train_step = getattr(mod, "make_train_step", default_train_step)(ctx)
    return divergence.guard_step(
        train_step, config.optimizer.skip_nonfinite, updated=_ema_parameters
    )


def _ema_parameters(state: dict) -> Any:
    """The EMA's parameters after a step: decay * ema + (1 - decay) * the updated parameters
    with decay in [0, 1) (or those parameters, taken live), so from a finite EMA they are
    finite exactly where the updated parameters are. The finite check reads them rather than
    the parameters because XLA then fuses the optimizer update, the EMA and the check into one
    pass over each parameter; read on the parameters, the check's reduction kept the EMA a
    pass of its own (salgl_coco's AdamW, EMA and check on one v5e chip: 7.73 -> 6.84 ms by
    the compiled ops' estimated cycles, 10.45 -> 9.49 GB accessed; README, Accelerators)."""
    return state["ema"]["params"]


def jit_train_step(
    mod, graphdef: nnx.GraphDef, tx, config: ml_collections.ConfigDict, total: int, mesh, state
):
    """`make_train_step` jitted over `mesh` as training runs it: the state (laid out by
    `sharding.state_shardings`; `state` may be arrays or `jax.ShapeDtypeStruct`s) donated,
    batches sharded on the data axis, the metrics replicated."""
    state_sh = sharding.state_shardings(mesh, state)
    return jax.jit(
        make_train_step(mod, graphdef, tx, config, total),
        in_shardings=(state_sh, sharding.batch_sharded(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        # Without it every step allocates a new state, which slows the step.
        donate_argnums=0,
    )

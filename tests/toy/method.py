"""A toy method that uses every optional part of the method protocol (`mlgraph.models`):

* `make_optimizer`: two Adam optimizers, one for the backbone and one for the head, each with
  its own moments and step count;
* `make_train_step`: two optimizer updates per iteration, the head's first and then the
  backbone's from a second forward pass with the updated head (as Scob's two-step update);
* `init_extra` + `batch["index"]`: a per-example matrix `seen` [N, 1] counting how often each
  training example was drawn, and `pseudo` [N, C], soft targets mixed into the loss;
* `epoch_end`: after each epoch `pseudo` takes the live model's scores on the training set
  (as EM+APL's pseudo-labelling pass), and `epochs` counts the calls.

Used as `config.model.name = "toy.method"` (a dotted name is imported as it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlgraph import losses
from mlgraph.models import backbones
from mlgraph.models.common import NO_KWARGS

GROUPS = ("head", "backbone")


class Model(nnx.Module):
    """A backbone, mean pooling and a linear head."""

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        num_train_examples: int | None = None,
        backbone: str = "simple_cnn",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
        mix: float = 0.5,
    ):
        """`mix`: the weight of the pseudo targets in the loss's targets."""
        del num_train_examples  # the per-example state is `extra`, not a parameter here
        self.backbone = backbones.build(
            backbone, image_size=image_size, dtype=dtype, rngs=rngs, **backbone_kwargs
        )
        self.head = nnx.Linear(self.backbone.num_features, num_classes, rngs=rngs)
        self.mix = float(mix)

    def __call__(self, images, *, labels=None, train=False, rngs=None):
        """Images -> {'logits' [B, C]}."""
        del labels, rngs
        tokens = self.backbone(images, train=train)
        return {"logits": self.head(tokens.mean(axis=1)).astype(jnp.float32)}


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict]:
    """BCE against the labels mixed with the example's pseudo targets (when the step gives
    them)."""
    targets = batch["labels"]
    if "pseudo" in batch:
        mix = config.model.mix
        targets = (1 - mix) * targets + mix * batch["pseudo"]
    loss = losses.bce(outputs["logits"], targets)
    return loss, {"bce": loss}


class TwoOptimizers:
    """One Adam per parameter group (`GROUPS`): the optimizer state is a dict by group."""

    def __init__(self, lr: float):
        self.txs = {g: optax.adam(lr) for g in GROUPS}

    def init(self, params):
        """Each group's Adam state over that group's parameters only."""
        return {g: tx.init(params[g]) for g, tx in self.txs.items()}


def make_optimizer(config, total_steps: int, params) -> TwoOptimizers:
    """The two optimizers (`config.optimizer.lr` each; no schedule)."""
    del total_steps, params
    return TwoOptimizers(config.optimizer.lr)


def init_extra(config, training) -> dict:
    """Per-example state, indexed by `batch["index"]`, and the epoch count."""
    del config
    return {
        "seen": jnp.zeros((training.num_examples, 1), jnp.int32),
        "pseudo": jnp.zeros((training.num_examples, training.num_classes), jnp.float32),
        "epochs": jnp.zeros((), jnp.int32),
    }


def make_train_step(ctx):
    """Two updates per iteration: the head from the first backward pass, then the backbone
    from a second forward/backward pass with the updated head."""

    def update(group, params, rest, opt, batch, step):
        loss, aux, rest, grads = ctx.loss_and_grads(params, rest, batch, step)
        updates, opt_g = ctx.tx.txs[group].update(grads[group], opt[group], params[group])
        new = optax.apply_updates(params[group], updates)
        params = nnx.State(dict(params.raw_mapping) | {group: new.raw_mapping})
        return params, rest, dict(opt) | {group: opt_g}, loss, aux

    def train_step(state, batch):
        extra = state["extra"]
        batch = dict(batch, pseudo=extra["pseudo"][batch["index"]])
        params, rest, opt = state["params"], state["rest"], state["opt"]
        params, rest, opt, loss, aux = update("head", params, rest, opt, batch, state["step"])
        params, rest, opt, _, _ = update("backbone", params, rest, opt, batch, state["step"])
        seen = extra["seen"].at[batch["index"], 0].add(1)
        new = ctx.finish(state, params, rest, opt, extra=dict(extra, seen=seen))
        return new, {"loss": loss, "lr": jnp.float32(ctx.config.optimizer.lr), **aux}

    return train_step


def epoch_end(ctx, state: dict, epoch: int) -> dict:
    """The live model's training-set scores become the pseudo targets."""
    del epoch
    scores = jnp.asarray(ctx.score(state))
    extra = dict(state["extra"], pseudo=scores, epochs=state["extra"]["epochs"] + 1)
    return dict(state, extra=jax.device_put(extra, jax.tree.leaves(state["extra"])[0].sharding))

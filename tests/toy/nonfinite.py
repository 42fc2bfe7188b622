"""The baseline with a loss that is NaN on every batch holding the training example at position
0 (one batch an epoch): a run that diverges now and then, for `optimizer.skip_nonfinite`.

Used as `config.model.name = "toy.nonfinite"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlgraph.models import baseline

Model = baseline.Model


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict]:
    """The baseline's loss, or NaN when the batch holds example 0."""
    loss, aux = baseline.loss_fn(outputs, batch, config)
    return jnp.where(jnp.any(batch["index"] == 0), jnp.nan, loss), aux

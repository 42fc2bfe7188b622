"""Multi-label classification losses: BCE, ASL, and the single-positive losses.

All take logits [B, C] and targets [B, C] in {0, 1} and return a scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy with logits, averaged over every (image, class) entry.

    Same as `torch.nn.BCEWithLogitsLoss()` (reduction 'mean'). Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    per_entry = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return per_entry.mean()

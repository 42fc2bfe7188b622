"""Multi-label classification losses: BCE, ASL, and the single-positive losses.

All take logits [B, C] and targets [B, C] in {0, 1} and return a scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlgraph.errors import ConfigError


def bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy with logits, averaged over every (image, class) entry.

    Same as `torch.nn.BCEWithLogitsLoss()` (reduction 'mean'). Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    per_entry = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return per_entry.mean()


def asl(
    logits: jax.Array,
    targets: jax.Array,
    gamma_pos: float = 0.0,
    gamma_neg: float = 2.0,
    clip: float = 0.0,
    eps: float = 1e-5,
) -> jax.Array:
    """Asymmetric loss (ASL, `AsymmetricLossOptimized` with `disable_torch_grad_focal_loss`).

    With p = sigmoid(logit) and p_- = min(1 - p + clip, 1) (just 1 - p when clip = 0):
      l = y log(max(p, eps)) + (1 - y) log(max(p_-, eps)),
      w = (1 - p)^gamma_pos for positives and (1 - p_-)^gamma_neg for negatives,
    and the loss is -(sum of l * w) / B / C * 1000. The focusing weight w is a constant for the
    gradient (stop_gradient), as in the torch code's `no_grad` block. Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    p_neg = 1.0 - p
    if clip > 0:
        p_neg = jnp.minimum(p_neg + clip, 1.0)
    loss = y * jnp.log(jnp.maximum(p, eps)) + (1.0 - y) * jnp.log(jnp.maximum(p_neg, eps))
    if gamma_neg > 0 or gamma_pos > 0:
        base = 1.0 - p * y - p_neg * (1.0 - y)
        exponent = gamma_pos * y + gamma_neg * (1.0 - y)
        loss = loss * jax.lax.stop_gradient(jnp.power(base, exponent))
    b, c = logits.shape
    return -loss.sum() / b / c * 1000.0


LOSSES = ("asl", "bce")


def classification(logits: jax.Array, targets: jax.Array, loss_cfg) -> jax.Array:
    """The classification loss `loss_cfg.name` ('bce' or 'asl' with `loss_cfg`'s gammas, clip
    and eps) of logits [B, C] against 0/1 targets.

    Raises:
      ConfigError: for another name.
    """
    if loss_cfg.name == "bce":
        return bce(logits, targets)
    if loss_cfg.name == "asl":
        return asl(
            logits,
            targets,
            gamma_pos=loss_cfg.gamma_pos,
            gamma_neg=loss_cfg.gamma_neg,
            clip=loss_cfg.clip,
            eps=loss_cfg.eps,
        )
    raise ConfigError(f"config.loss.name={loss_cfg.name!r}: expected one of {', '.join(LOSSES)}")


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy along `axis`: -sum p log(p + 1e-7) (SALGL's `EntropyLoss`, unreduced)."""
    p = p.astype(jnp.float32)
    return -jnp.sum(p * jnp.log(p + 1e-7), axis=axis)


def sample_entropy(scene_probs: jax.Array) -> jax.Array:
    """Mean over images of the entropy of each image's scene distribution [B, K] -> scalar.

    Minimising it makes every image's scene assignment confident.
    """
    return entropy(scene_probs).mean()


def batch_entropy(scene_probs: jax.Array) -> jax.Array:
    """(H_max - H(mean_b p_b)) * 100 for scene probabilities [B, K] -> scalar.

    H_max is the entropy of the uniform distribution over the K scenes, computed with the same
    1e-7 offset as in the original (so it is log K up to ~1e-7 K). Minimising it pushes the
    batch's average scene distribution towards uniform. The mean runs over the batch given; the
    original used the per-GPU batch, a jitted data-parallel step passes the global one.
    """
    k = scene_probs.shape[-1]
    h_max = entropy(jnp.full((k,), 1.0 / k, jnp.float32))
    return (h_max - entropy(scene_probs.astype(jnp.float32).mean(axis=0))) * 100.0

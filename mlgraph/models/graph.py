"""Label-graph parts: scene-conditional co-occurrence statistics, adjacency sampling and the gated
graph neural network (docs/salgl.md §1.7-§1.10).

Shapes: B batch, K scenes, C classes, D feature width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph.models.layers import torch_linear


def cooccurrence_update(scene_probs: jax.Array, labels: jax.Array, soft: bool) -> jax.Array:
    """The batch's contribution to the scene co-occurrence counts: delta [K, C, C].

    delta[k] = sum_b P[b, k] * y_b y_b^T, with P the one-hot of argmax_k scene_probs (hard) or the
    probabilities themselves (soft). Hard mode carries no gradient; soft mode is differentiable
    in `scene_probs` (the caller adds it to a stop-gradient copy of the old counts, so the
    gradient path lasts one step, like the torch code's `detach_()`).

    Pass the global batch: under `jax.jit` with a batch-sharded input the contraction over b
    is a global reduction, the equivalent of the original's all-gather across ranks.

    Args:
      scene_probs: [B, K] scene probabilities (softmax of the scene scores).
      labels: [B, C] multi-hot targets (0/1).
      soft: soft (probability-weighted) instead of hard (argmax) assignment.
    """
    labels = labels.astype(jnp.float32)
    if soft:
        weights = scene_probs.astype(jnp.float32)
    else:
        k = scene_probs.shape[-1]
        weights = jax.nn.one_hot(jnp.argmax(scene_probs, axis=-1), k, dtype=jnp.float32)
        weights, labels = jax.lax.stop_gradient(weights), jax.lax.stop_gradient(labels)
    # HIGHEST: on TPU the default float32 matmul runs bfloat16 passes, which would round soft
    # weights (hard counts are exact either way).
    return jnp.einsum("bk,bi,bj->kij", weights, labels, labels, precision=jax.lax.Precision.HIGHEST)


def comatrix_to_prob(comatrix: jax.Array, normalize: bool, ignore_self: bool) -> jax.Array:
    """Scene-conditional transition matrices from co-occurrence counts: [K, C, C] -> [K, C, C].

    P_k[i, j] = C_k[j, i] / (C_k[i, i] + 1e-8), an estimate of P(label j | label i, scene k);
    `ignore_self` then zeroes the diagonal, and `normalize` divides each row by (its sum + 1e-8).
    All-zero rows stay zero.
    """
    comatrix = comatrix.astype(jnp.float32)
    transposed = jnp.swapaxes(comatrix, 1, 2)
    diag = jnp.diagonal(comatrix, axis1=1, axis2=2)[:, :, None]  # [K, C, 1]
    probs = transposed / (diag + 1e-8)
    if ignore_self:
        probs = probs * (1.0 - jnp.eye(comatrix.shape[-1], dtype=probs.dtype))
    if normalize:
        probs = probs / (probs.sum(axis=-1, keepdims=True) + 1e-8)
    return probs


def sample_adjacency(probs_matrix: jax.Array, scene_probs: jax.Array, soft: bool) -> jax.Array:
    """Each image's label graph: [K, C, C] and [B, K] -> [B, C, C].

    Hard: the matrix of the image's most probable scene. Soft: the scene-probability-weighted
    sum of the K matrices (differentiable in `scene_probs`).
    """
    if soft:
        return jnp.einsum(
            "bk,kij->bij",
            scene_probs.astype(jnp.float32),
            probs_matrix,
            precision=jax.lax.Precision.HIGHEST,
        )
    return probs_matrix[jnp.argmax(scene_probs, axis=-1)]


class GatedGNN(nnx.Module):
    """Gated graph neural network with weights shared across `num_steps` propagation steps.

    With A the per-image adjacency [B, C, C] and h [B, C, D], one step is
      m = [A h ; A^T h] (outmess) or A h,
      z = sigmoid(W1 m + U1 h),  r = sigmoid(W2 m + U2 h),
      h~ = tanh(W3 m + U3 (r * h)),  h <- (1 - z) h + z h~,
    where every W and U is a Linear with its own bias (`fc{1,2,3}_w`, `fc{1,2,3}_u`, the torch
    names). `num_steps=0` returns h unchanged.

    `reset_uses_update_u=True` reproduces official SSGRL (docs/ssgrl_mlgcn.md §1.5): the reset gate
    reads U1 (the update gate's) instead of U2, r = sigmoid(W2 m + U1 h); `fc2_u` is then kept
    (checkpoints hold it) but unused.
    """

    def __init__(
        self,
        dim: int,
        num_steps: int,
        outmess: bool,
        *,
        reset_uses_update_u: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_steps = int(num_steps)
        self.reset_uses_update_u = bool(reset_uses_update_u)
        self.outmess = bool(outmess)
        din = 2 * dim if outmess else dim
        self.fc1_w = torch_linear(din, dim, **kw)
        self.fc1_u = torch_linear(dim, dim, **kw)
        self.fc2_w = torch_linear(din, dim, **kw)
        self.fc2_u = torch_linear(dim, dim, **kw)
        self.fc3_w = torch_linear(din, dim, **kw)
        self.fc3_u = torch_linear(dim, dim, **kw)

    def step(self, h: jax.Array, adjacency: jax.Array) -> jax.Array:
        """One propagation and gated update: h [B, C, D], adjacency [B, C, C] -> [B, C, D]."""
        adj = adjacency.astype(h.dtype)
        m = jnp.einsum("bij,bjd->bid", adj, h)
        if self.outmess:
            m = jnp.concatenate([m, jnp.einsum("bji,bjd->bid", adj, h)], axis=-1)
        u1 = self.fc1_u(h)
        z = jax.nn.sigmoid(self.fc1_w(m) + u1)
        r = jax.nn.sigmoid(self.fc2_w(m) + (u1 if self.reset_uses_update_u else self.fc2_u(h)))
        h_new = jnp.tanh(self.fc3_w(m) + self.fc3_u(r * h))
        return (1 - z) * h + z * h_new

    def __call__(self, h: jax.Array, adjacency: jax.Array) -> jax.Array:
        """Run `num_steps` steps from the node features h [B, C, D]."""
        for _ in range(self.num_steps):
            h = self.step(h, adjacency)
        return h

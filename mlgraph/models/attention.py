"""Attention modules of the graph methods: torch's multi-head attention, DETR-style post-norm
transformer encoder and decoder layers, the 2-D sine position table, and low-rank bilinear
(label-to-region) attention. The attention core and the torch initializers they share with the
backbones are in `mlgraph.models.layers`.

Everything follows PyTorch's semantics and parameter layout so that checkpoints convert by a
plain renaming (see docs/salgl.md §1.2, §1.3, §1.6 and docs/ssgrl_mlgcn.md §1.2):

* `MultiheadAttention` is `torch.nn.MultiheadAttention(batch_first=True)` with its fused
  `in_proj_weight` held as three Linears `q_proj`, `k_proj`, `v_proj` (rows [0, D), [D, 2D),
  [2D, 3D) of the torch matrix) and `out_proj`.
* `TransformerEncoderLayer` is DETR's post-norm layer (`q = k = x + pos`, `v = x`).
* `LowRankBilinearAttention` keeps the four torch Linears (`linear1`, `linear2`,
  `hidden_linear`, `target_linear`) but evaluates the attention logits through the folded vector
  v = W_hidden^T w_target, which never forms the [B, C, N, A] hidden projection; its custom
  backward pass recomputes tanh in class chunks, so training does not store [B, C, N, A] either.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgraph.models.layers import dot_product_attention, torch_linear, xavier_uniform


class MultiheadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention(dim, num_heads, dropout, batch_first=True)`.

    The heads are consecutive `dim / num_heads` slices of the feature axis, the query is scaled
    by 1/sqrt(head_dim), and dropout acts on the attention probabilities (training only).
    Initialisation follows torch: the fused in-projection is xavier-uniform over its [3D, D]
    shape (so each of q/k/v draws from U(±sqrt(6 / 4D))) with zero bias; `out_proj` has torch's
    Linear weight init (or `kernel_init`, where the model re-initialises its matrices) and a
    zero bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        kernel_init: nnx.Initializer | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"MultiheadAttention: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dtype = dtype
        xavier = xavier_uniform((dim, 3 * dim))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(dim, dim, kernel_init=xavier, **kw)
        self.k_proj = nnx.Linear(dim, dim, kernel_init=xavier, **kw)
        self.v_proj = nnx.Linear(dim, dim, kernel_init=xavier, **kw)
        self.out_proj = torch_linear(dim, dim, zero_bias=True, kernel_init=kernel_init, **kw)
        self.attn_drop = nnx.Dropout(dropout)

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        mask: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        sow_weights: bool = False,
    ) -> jax.Array:
        """Attend `query` [B, Lq, D] over `key`/`value` [B, Lk, D]; returns [B, Lq, D].

        `mask` (optional, boolean, broadcastable to [B, heads, Lq, Lk]) marks the pairs that may
        attend (True), as the inverse of torch's boolean `attn_mask`. `sow_weights`: keep the
        attention probabilities [B, heads, Lq, Lk] (softmax over the keys, before dropout) as
        the `nnx.Intermediate` 'attention_weights', as flax's `nnx.MultiHeadAttention` does.
        """
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        drop = functools.partial(self.attn_drop, deterministic=not train, rngs=rngs)
        out = dot_product_attention(
            q, k, v, self.num_heads, mask=mask, dropout=drop, return_probs=sow_weights
        )
        if sow_weights:
            out, probs = out
            self.sow(nnx.Intermediate, "attention_weights", probs)
        return self.out_proj(out)


class TransformerEncoderLayer(nnx.Module):
    """DETR's post-norm encoder layer (`forward_post`) with torch MultiheadAttention semantics.

        q = k = x + pos,  v = x
        x = norm1(x + dropout1(attn(q, k, v)))
        x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))

    This is also `torch.nn.TransformerEncoderLayer(norm_first=False)` (no `pos`). LayerNorms use
    torch's eps 1e-5. Attribute names are torch's, so a checkpoint's `layers.0.linear1.weight`
    maps to `linear1/kernel`. `kernel_init` (default: torch's Linear init) draws the
    `out_proj`, `linear1` and `linear2` kernels; `activation` is the feed-forward
    non-linearity (ReLU; Scob's is leaky ReLU, slope 0.01).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        *,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        kernel_init: nnx.Initializer | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = dict(kernel_init=kernel_init, **kw)
        self.activation = activation
        self.self_attn = MultiheadAttention(dim, num_heads, dropout=dropout, **init)
        self.linear1 = torch_linear(dim, ffn_dim, **init)
        self.dropout = nnx.Dropout(dropout)
        self.linear2 = torch_linear(ffn_dim, dim, **init)
        # The two-pass variance: the one-pass E[x^2] - E[x]^2 loses digits on residual streams
        # with large means, which shows in parity with torch.
        ln = dict(epsilon=1e-5, use_fast_variance=False, **kw)
        self.norm1 = nnx.LayerNorm(dim, **ln)
        self.norm2 = nnx.LayerNorm(dim, **ln)
        self.dropout1 = nnx.Dropout(dropout)
        self.dropout2 = nnx.Dropout(dropout)

    def __call__(
        self,
        x: jax.Array,
        pos: jax.Array | None = None,
        *,
        key_mask: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Tokens [B, N, D] (and optional position codes broadcastable to them) -> [B, N, D].

        `key_mask` (optional, boolean [B, N]): True marks the tokens that may be attended to,
        the inverse of torch's `src_key_padding_mask`; masked tokens still attend and give
        outputs. A row with no attendable token gets uniform weights, not torch's NaN.
        """
        det = not train
        qk = x if pos is None else x + pos.astype(x.dtype)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = self.self_attn(qk, qk, x, mask=mask, train=train, rngs=rngs)
        x = self.norm1(x + self.dropout1(y, deterministic=det, rngs=rngs))
        y = self.dropout(self.activation(self.linear1(x)), deterministic=det, rngs=rngs)
        y = self.linear2(y)
        return self.norm2(x + self.dropout2(y, deterministic=det, rngs=rngs))


class TransformerDecoderLayer(nnx.Module):
    """DETR's post-norm decoder layer (`forward_post`), with an optional self-attention block.

        if self_attn:  q = k = t + query_pos;  t = norm1(t + dropout1(self_attn(q, k, t)))
        t = norm2(t + dropout2(multihead_attn(t + query_pos, memory + pos, memory)))
        t = norm3(t + dropout3(linear2(dropout(relu(linear1(t))))))

    Query2Label removes the self-attention of its decoder layers by default (docs/ssgrl_mlgcn.md
    §4.1); `self_attn=False` builds the layer without `self_attn`/`norm1`, as the official
    checkpoints have no such keys. Attribute names are torch's. `kernel_init` (default: torch's
    Linear init) draws the `out_proj`, `linear1` and `linear2` kernels.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        *,
        self_attn: bool = True,
        kernel_init: nnx.Initializer | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = dict(kernel_init=kernel_init, **kw)
        ln = dict(epsilon=1e-5, use_fast_variance=False, **kw)
        if self_attn:
            self.self_attn = MultiheadAttention(dim, num_heads, dropout=dropout, **init)
            self.norm1 = nnx.LayerNorm(dim, **ln)
        else:
            self.self_attn = None
            self.norm1 = None
        self.multihead_attn = MultiheadAttention(dim, num_heads, dropout=dropout, **init)
        self.norm2 = nnx.LayerNorm(dim, **ln)
        self.linear1 = torch_linear(dim, ffn_dim, **init)
        self.linear2 = torch_linear(ffn_dim, dim, **init)
        self.norm3 = nnx.LayerNorm(dim, **ln)
        self.dropout = nnx.Dropout(dropout)
        self.dropout1 = nnx.Dropout(dropout)
        self.dropout2 = nnx.Dropout(dropout)
        self.dropout3 = nnx.Dropout(dropout)

    def __call__(
        self,
        tgt: jax.Array,
        memory: jax.Array,
        *,
        pos: jax.Array | None = None,
        query_pos: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        sow_weights: bool = False,
    ) -> jax.Array:
        """Targets [B, Q, D] attend over memory [B, N, D] -> [B, Q, D].

        `pos` (memory position codes) and `query_pos` (query embeddings) broadcast to the
        memory and the targets; they are added to the keys and queries, never to the values.
        `sow_weights`: the cross-attention keeps its weights [B, heads, Q, N]
        (`MultiheadAttention`'s 'attention_weights' of `multihead_attn`).
        """
        det = not train

        def with_pos(x: jax.Array, p: jax.Array | None) -> jax.Array:
            return x if p is None else x + p.astype(x.dtype)

        if self.self_attn is not None:
            q = with_pos(tgt, query_pos)
            y = self.self_attn(q, q, tgt, train=train, rngs=rngs)
            tgt = self.norm1(tgt + self.dropout1(y, deterministic=det, rngs=rngs))
        y = self.multihead_attn(
            with_pos(tgt, query_pos),
            with_pos(memory, pos),
            memory,
            train=train,
            rngs=rngs,
            sow_weights=sow_weights,
        )
        tgt = self.norm2(tgt + self.dropout2(y, deterministic=det, rngs=rngs))
        y = self.dropout(nnx.relu(self.linear1(tgt)), deterministic=det, rngs=rngs)
        y = self.linear2(y)
        return self.norm3(tgt + self.dropout3(y, deterministic=det, rngs=rngs))


def sine_position_encoding(
    dim: int, grid: int | tuple[int, int], *, temperature: float = 10000.0
) -> np.ndarray:
    """DETR's normalised 2-D sine position table, flattened to tokens: [H*W, dim] float32.

    With F = dim / 2, row i and column j counted from 1, y_i = 2*pi*i / (H + 1e-6) and likewise
    x_j: channels [0, F) hold the y-features and [F, 2F) the x-features; within each half,
    channel f is sin (f even) or cos (f odd) of coordinate / temperature^(2*floor(f/2)/F).
    Tokens are row-major (h outer, w inner), the order of a flattened NHWC map. Computed in
    float32 like the PyTorch buffer it replaces.
    """
    if dim % 2:
        raise ValueError(f"sine_position_encoding: dim must be even, got {dim}")
    h, w = (grid, grid) if isinstance(grid, int) else grid
    f = dim // 2
    f32 = np.float32
    scale = f32(2 * math.pi)
    y = np.arange(1, h + 1, dtype=f32) / (f32(h) + f32(1e-6)) * scale
    x = np.arange(1, w + 1, dtype=f32) / (f32(w) + f32(1e-6)) * scale
    dim_t = f32(temperature) ** (f32(2) * (np.arange(f, dtype=f32) // 2) / f32(f))

    def features(coord: np.ndarray) -> np.ndarray:
        arg = coord[:, None] / dim_t  # [L, F]
        out = np.empty_like(arg)
        out[:, 0::2] = np.sin(arg[:, 0::2])
        out[:, 1::2] = np.cos(arg[:, 1::2])
        return out

    fy, fx = features(y), features(x)
    table = np.concatenate(
        [np.broadcast_to(fy[:, None, :], (h, w, f)), np.broadcast_to(fx[None, :, :], (h, w, f))],
        axis=-1,
    )
    return table.reshape(h * w, dim).astype(f32)


def _folded_logits(u: jax.Array, w: jax.Array, v: jax.Array) -> jax.Array:
    """t[b, c, n] = sum_a tanh(u[b, n, a] * w[b, c, a]) * v[a], accumulated in float32.

    An elementwise product feeding a reduction (not an einsum), so XLA fuses it into one loop
    and the [B, C, N, A] tensor is never stored.
    """
    z = jnp.tanh(u[:, None, :, :] * w[:, :, None, :])
    return jnp.sum((z * v).astype(jnp.float32), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def folded_bilinear_logits(
    u: jax.Array, w: jax.Array, v: jax.Array, class_chunk: int = 8
) -> jax.Array:
    """Low-rank bilinear attention logits through the folded vector, memory-bounded.

    t[b, c, n] = sum_a tanh(u[b, n, a] * w[b', c, a]) * v[a], with u [B, N, A], w [B or 1,
    C, A] (b' = b or 0) and v [A]; float32 [B, C, N].

    The forward pass is one fused reduction. The backward pass keeps only (u, w, v) and
    recomputes tanh over `class_chunk` classes at a time, so its temporaries are
    [B, class_chunk, N, A] instead of several [B, C, N, A] tensors (the latter is ~1 GB per
    tensor for B = 16, C = 80, N = 196, A = 1024 in float32).
    """
    return _folded_logits(u, w, v)


def _folded_fwd(u, w, v, class_chunk):
    return _folded_logits(u, w, v), (u, w, v)


def _folded_bwd(class_chunk, residuals, g):
    u, w, v = residuals
    b, n, a = u.shape
    bw, c, _ = w.shape
    cc = max(1, min(class_chunk, c))
    pad = -c % cc
    f32 = jnp.float32
    u32, v32 = u.astype(f32), v.astype(f32)
    # Padded classes have zero cotangent, so they add nothing; their dw rows are dropped.
    w_chunks = jnp.pad(w.astype(f32), ((0, 0), (0, pad), (0, 0)))
    w_chunks = w_chunks.reshape(bw, -1, cc, a).transpose(1, 0, 2, 3)  # [chunks, Bw, cc, A]
    g_chunks = jnp.pad(g.astype(f32), ((0, 0), (0, pad), (0, 0)))
    g_chunks = g_chunks.reshape(b, -1, cc, n).transpose(1, 0, 2, 3)  # [chunks, B, cc, N]

    def chunk(carry, xs):
        du, dv = carry
        wc, gc = xs
        z = jnp.tanh(u32[:, None] * wc[:, :, None])  # [B, cc, N, A]
        dpre = gc[..., None] * v32 * (1.0 - z * z)
        du = du + jnp.sum(dpre * wc[:, :, None], axis=1)
        dwc = jnp.sum(dpre * u32[:, None], axis=2)  # [B, cc, A]
        if bw == 1:
            dwc = dwc.sum(axis=0, keepdims=True)
        dv = dv + jnp.sum(gc[..., None] * z, axis=(0, 1, 2))
        return (du, dv), dwc

    init = (jnp.zeros((b, n, a), f32), jnp.zeros((a,), f32))
    (du, dv), dw = jax.lax.scan(chunk, init, (w_chunks, g_chunks))
    dw = dw.transpose(1, 0, 2, 3).reshape(bw, -1, a)[:, :c]
    return du.astype(u.dtype), dw.astype(w.dtype), dv.astype(v.dtype)


folded_bilinear_logits.defvjp(_folded_fwd, _folded_bwd)


class LowRankBilinearAttention(nnx.Module):
    """Label-to-region attention by low-rank bilinear pooling (docs/salgl.md §1.6,
    docs/ssgrl_mlgcn.md §1.2).

    For tokens x [B, N, D] and label embeddings l [C, E]:
      u = W1 x (no bias), w = W2 l (no bias), z = tanh(u ⊙ w)  [B, C, N, A],
      t = w_t^T (W_h z + b_h) + b_t,  alpha = softmax over the N tokens,
      f[b, c] = sum_n alpha[b, c, n] x[b, n]   (the tokens themselves, not u).

    The two stacked Linears are affine in z, so t = v^T z + const with v = W_h^T w_t; the
    constant cancels in the softmax. The logits are therefore computed from v (exact up to float
    rounding, also for gradients: the biases b_h, b_t get zero gradient either way). This drops
    the A x A matmul over every (b, c, n) and the [B, C, N, A] activations; the original four
    parameters are kept so checkpoints map one to one.
    """

    def __init__(
        self,
        dim1: int,
        dim2: int,
        att_dim: int = 1024,
        hidden_dim: int | None = None,
        *,
        class_chunk: int = 8,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Args: dim1 token width D, dim2 embedding width E, att_dim A, hidden_dim (default A),
        class_chunk: classes per step of the backward pass (bounds its memory)."""
        hidden_dim = att_dim if hidden_dim is None else hidden_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.class_chunk = int(class_chunk)
        self.linear1 = torch_linear(dim1, att_dim, use_bias=False, **kw)
        self.linear2 = torch_linear(dim2, att_dim, use_bias=False, **kw)
        self.hidden_linear = torch_linear(att_dim, hidden_dim, **kw)
        self.target_linear = torch_linear(hidden_dim, 1, **kw)

    def folded_vector(self) -> jax.Array:
        """v = W_hidden^T w_target [A] (float32): the logits are v . z plus a constant."""
        kh = self.hidden_linear.kernel[...].astype(jnp.float32)  # [A, A_hidden]
        kt = self.target_linear.kernel[...].astype(jnp.float32)  # [A_hidden, 1]
        return (kh @ kt)[:, 0]

    def __call__(self, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tokens x [B, N, D], label embeddings [C, E] or [B, C, E].

        Returns:
          (label_feats [B, C, D], alphas [B, C, N] float32).
        """
        u = self.linear1(x)  # [B, N, A]
        w = self.linear2(labels)  # [C, A] or [B, C, A]
        if w.ndim == 2:
            w = w[None]
        v = self.folded_vector().astype(u.dtype)
        logits = folded_bilinear_logits(u, w, v, self.class_chunk)
        alphas = jax.nn.softmax(logits, axis=-1)
        label_feats = jnp.einsum("bcn,bnd->bcd", alphas.astype(x.dtype), x)
        return label_feats, alphas

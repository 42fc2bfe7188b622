"""Model parts shared across methods and backbones, written once: the multi-head attention core,
PyTorch-style initializers and Linear, and the per-class linear classifier.

* `dot_product_attention` is the softmax attention of torch's `nn.MultiheadAttention`, timm's
  ViT, OpenAI CLIP and HF BERT alike; each module keeps its own projections (and so its own
  parameter names for checkpoint conversion) and calls this core between them.
* `uniform_init`, `xavier_uniform` and `torch_linear` reproduce torch's default and
  `xavier_uniform_` draws on flax's [in, out] kernel layout.
* `ElementWiseLinear` is the per-class `Element_Wise_Layer` classifier of SSGRL, SALGL
  (salgl.md §1.11) and Query2Label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    *,
    mask: jax.Array | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention on already projected features.

    Args:
      q, k, v: [B, L, D] (keys/values may have another length); heads are the consecutive
        D/num_heads slices of the feature axis, as in torch's MultiheadAttention and timm.
      num_heads: number of heads.
      mask: optional, broadcastable to [B, num_heads, Lq, Lk]. Boolean: True marks the pairs
        that may attend (the inverse of torch's boolean `attn_mask`); a fully masked row gets
        uniform weights, not NaN. Otherwise additive: added to the scaled logits.
      dropout: optional function applied to the float32 attention probabilities (an
        `nnx.Dropout` bound to its `deterministic` flag and rngs).

    Returns:
      [B, Lq, D] (before the output projection).
    """
    b, lq, d = q.shape
    hd = d // num_heads
    q = q.reshape(b, lq, num_heads, hd)
    k = k.reshape(b, k.shape[1], num_heads, hd)
    v = v.reshape(b, v.shape[1], num_heads, hd)
    # Logits, mask and softmax in float32 even under bfloat16 compute, for stability; the scale
    # is applied after the cast so that it rounds in float32 too.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    if mask is not None:
        if mask.dtype == jnp.bool_:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        else:
            logits = logits + mask.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, lq, d)


def uniform_init(bound: float) -> nnx.Initializer:
    """Initializer drawing from U(-bound, bound), PyTorch's `uniform_(-bound, bound)`."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_uniform(fans: tuple[int, int] | None = None) -> nnx.Initializer:
    """torch's `xavier_uniform_`: U(±sqrt(6 / (fan_in + fan_out))) for a kernel [in, out].

    The fans are read from the drawn kernel's shape unless `fans` gives them: torch draws its
    fused in-projection [3D, D] as one matrix, so each D x D block of it passes (D, 3D).
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        fan_in, fan_out = shape if fans is None else fans
        return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))(key, shape, dtype)

    return init


def torch_linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    zero_bias: bool = False,
    kernel_init: nnx.Initializer | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """An `nnx.Linear` initialised like `torch.nn.Linear`: weight and bias U(±1/sqrt(fan_in)).

    `zero_bias=True` starts the bias at 0 instead (torch's MultiheadAttention `out_proj`);
    `kernel_init` replaces the weight's draw (e.g. `xavier_uniform()` where a torch model
    re-initialises its matrices), the bias keeping torch's.
    """
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=uniform_init(bound) if kernel_init is None else kernel_init,
        bias_init=nnx.initializers.zeros if zero_bias else uniform_init(bound),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class ElementWiseLinear(nnx.Module):
    """One linear classifier per class: logit[b, c] = <x[b, c], weight[c]> + bias[c].

    The torch `Element_Wise_Layer(C, D)`: weight [C, D], bias [C], both U(±1/sqrt(D)).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = uniform_init(1.0 / math.sqrt(dim))
        self.dtype = dtype
        self.weight = nnx.Param(init(rngs.params(), (num_classes, dim), param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (num_classes,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Per-class features [B, C, D] -> logits [B, C]."""
        x = x.astype(self.dtype)
        w, b = self.weight[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        return jnp.einsum("bcd,cd->bc", x, w) + b

"""BERT encoder (post-LN) in Flax NNX: all-MiniLM-L6-v2 (6 x 384, 12 heads) and bert-base.

Used to compute label embeddings (`mlgraph.labels.encoders`), never trained here, so there is
no dropout. Layer structure as in HF `BertModel`: embeddings (word + learned position + token
type) -> LayerNorm; each layer: x = LN(x + dense(attn(x))), x = LN(x + out(gelu(inter(x)))),
LayerNorm eps 1e-12, exact (erf) GELU.

Tree (the converter `mlgraph.convert.bert` maps HF keys onto it):
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding,
  embeddings/norm/{scale,bias},
  layers/{i}/{query,key,value,attention_out,intermediate,output}/{kernel,bias},
  layers/{i}/{attention_norm,output_norm}/{scale,bias}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph.models.layers import dot_product_attention

# The sizes of the two supported checkpoints (hidden, layers, heads, intermediate).
VARIANTS: dict[str, dict[str, int]] = {
    "minilm-l6": {"hidden": 384, "depth": 6, "num_heads": 12, "intermediate": 1536},
    "bert-base": {"hidden": 768, "depth": 12, "num_heads": 12, "intermediate": 3072},
}

_init = nnx.initializers.normal(0.02)


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        max_positions: int,
        type_vocab_size: int,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(vocab_size, hidden, embedding_init=_init, **kw)
        self.position_embeddings = nnx.Embed(max_positions, hidden, embedding_init=_init, **kw)
        self.token_type_embeddings = nnx.Embed(type_vocab_size, hidden, embedding_init=_init, **kw)
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-12, **kw)

    def __call__(self, ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """ids, token_type_ids [B, L] -> [B, L, H]; positions are 0..L-1."""
        positions = jnp.arange(ids.shape[1])[None]
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.norm(x)


class Layer(nnx.Module):
    """One post-LN BERT layer."""

    def __init__(
        self, hidden: int, num_heads: int, intermediate: int, *, dtype: Any, param_dtype: Any,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} is not divisible by num_heads {num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dense = lambda i, o: nnx.Linear(i, o, kernel_init=_init, **kw)
        self.num_heads = num_heads
        self.query = dense(hidden, hidden)
        self.key = dense(hidden, hidden)
        self.value = dense(hidden, hidden)
        self.attention_out = dense(hidden, hidden)
        self.attention_norm = nnx.LayerNorm(hidden, epsilon=1e-12, **kw)
        self.intermediate = dense(hidden, intermediate)
        self.output = dense(intermediate, hidden)
        self.output_norm = nnx.LayerNorm(hidden, epsilon=1e-12, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L, H] with key mask [B, 1, 1, L] (True = real token) -> [B, L, H]."""
        att = dot_product_attention(
            self.query(x), self.key(x), self.value(x), self.num_heads, mask=mask
        )
        x = self.attention_norm(x + self.attention_out(att))
        h = jax.nn.gelu(self.intermediate(x), approximate=False)
        return self.output_norm(x + self.output(h))


class BertEncoder(nnx.Module):
    """BERT without the pooler: token ids -> last-layer hidden states.

    Attributes:
      hidden_size: H (384 for MiniLM-L6, 768 for bert-base).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden: int,
        depth: int,
        num_heads: int,
        intermediate: int,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden_size = hidden
        self.max_positions = max_positions
        self.embeddings = Embeddings(vocab_size, hidden, max_positions, type_vocab_size, **kw)
        self.layers = nnx.List([Layer(hidden, num_heads, intermediate, **kw) for _ in range(depth)])

    def __call__(
        self,
        ids: jax.Array,
        mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids [B, L], attention mask [B, L] (1 = token, 0 = padding; default all ones)
        and token types [B, L] (default zeros) -> last hidden states [B, L, H].
        """
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_positions {self.max_positions}")
        if mask is None:
            mask = jnp.ones(ids.shape, bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        x = self.embeddings(ids, token_type_ids)
        key_mask = jnp.asarray(mask).astype(bool)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Average of the hidden states [B, L, H] over real tokens (mask [B, L]) -> [B, H].

    As sentence-transformers' mean pooling: the token count is clamped at 1e-9.
    """
    m = jnp.asarray(mask).astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def create(
    *,
    vocab_size: int,
    variant: str | None = "minilm-l6",
    hidden: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    type_vocab_size: int = 2,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> BertEncoder:
    """Build a BERT encoder of a `variant` (a key of `VARIANTS`), or with explicit sizes.

    Explicit sizes override the variant's; with `variant=None` all four are required.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown BERT variant {variant!r}; valid: {', '.join(VARIANTS)}")
    sizes = dict(VARIANTS[variant]) if variant is not None else {}
    given = dict(hidden=hidden, depth=depth, num_heads=num_heads, intermediate=intermediate)
    sizes |= {k: v for k, v in given.items() if v is not None}
    absent = [k for k in given if k not in sizes]
    if absent:
        raise ValueError(f"variant=None needs explicit {', '.join(absent)}")
    return BertEncoder(
        vocab_size=vocab_size,
        max_positions=max_positions,
        type_vocab_size=type_vocab_size,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **sizes,
    )

"""OpenAI CLIP towers (ViT image tower and text transformer) in Flax NNX, with OpenAI's names.

The trees mirror OpenAI's `model.py`, so the converter's table is a renaming:
`visual.transformer.resblocks.3.attn.in_proj_weight` -> `transformer/resblocks/3/attn/in_proj/
kernel` (transposed), `visual.conv1.weight` -> `conv1/kernel`, `class_embedding`,
`positional_embedding`, `ln_pre`, `ln_post`, `proj`; text: `token_embedding`,
`positional_embedding`, `transformer`, `ln_final`, `text_projection`.

Shared block (docs/sigrl.md §2.1, §6.3): pre-norm residual blocks, torch `nn.MultiheadAttention`
with its packed `in_proj` (rows [q; k; v]) and `out_proj`, MLP `c_fc` -> QuickGELU
(z * sigmoid(1.702 z)) -> `c_proj`, LayerNorm eps 1e-5 everywhere.

Outputs:
* `ImageTower.__call__(x) -> [B, 1 + g*g, width]`: every token after `ln_post`. OpenAI applies
  `ln_post` to the CLS token only; SigRL applies it to all tokens, and since LayerNorm acts per
  token the CLS row is the same either way.
* `ImageTower.encode_image(x) -> [B, embed_dim]`: OpenAI's image feature, ln_post(CLS) @ proj.
* `ImageTower.project(tokens) -> tokens @ proj`: SigRL's global and local features.
* `TextTower.__call__(ids) -> [B, L, width]`: token features after `ln_final`.
* `TextTower.encode_text(ids) -> [B, embed_dim]`: the feature at the EOT token (the arg-max of
  the ids, as OpenAI's code reads it) @ text_projection. No L2 normalisation anywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph.models.layers import dot_product_attention, patch_grid

# name -> image-tower sizes (width, depth, heads, patch, embed_dim) at OpenAI's defaults.
VARIANTS: dict[str, dict[str, int]] = {
    "ViT-B/32": {"width": 768, "depth": 12, "num_heads": 12, "patch_size": 32, "embed_dim": 512},
    "ViT-B/16": {"width": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "embed_dim": 512},
    "ViT-L/14": {"width": 1024, "depth": 24, "num_heads": 16, "patch_size": 14, "embed_dim": 768},
}
# The text tower of each variant.
TEXT_VARIANTS: dict[str, dict[str, int]] = {
    "ViT-B/32": {"width": 512, "depth": 12, "num_heads": 8, "embed_dim": 512},
    "ViT-B/16": {"width": 512, "depth": 12, "num_heads": 8, "embed_dim": 512},
    "ViT-L/14": {"width": 768, "depth": 12, "num_heads": 12, "embed_dim": 768},
}
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408

_normal = nnx.initializers.normal


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class MultiheadAttention(nnx.Module):
    """torch `nn.MultiheadAttention` (self-attention): packed `in_proj`, then `out_proj`."""

    def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        std = width**-0.5
        self.in_proj = nnx.Linear(width, 3 * width, kernel_init=_normal(std), **kw)
        self.out_proj = nnx.Linear(width, width, kernel_init=_normal(std), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]; `mask` boolean [L, L], False = not attended."""
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        return self.out_proj(dot_product_attention(q, k, v, self.num_heads, mask=mask))


class Mlp(nnx.Module):
    """`c_fc` -> QuickGELU -> `c_proj` (hidden = 4 x width)."""

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = nnx.Linear(width, 4 * width, kernel_init=_normal(width**-0.5), **kw)
        self.c_proj = nnx.Linear(4 * width, width, kernel_init=_normal(width**-0.5), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, **kw)
        self.attn = MultiheadAttention(width, num_heads, **kw)
        self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, **kw)
        self.mlp = Mlp(width, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    """A stack of `resblocks`."""

    def __init__(
        self, width: int, depth: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resblocks = nnx.List(
            [ResidualAttentionBlock(width, num_heads, **kw) for _ in range(depth)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        for block in self.resblocks:
            x = block(x, mask)
        return x


class ImageTower(nnx.Module):
    """CLIP's `VisionTransformer` (the `visual.` part of a CLIP state dict).

    Attributes:
      num_features: token width (768 for ViT-B/16); the backbone interface's D.
      embed_dim: width of the joint image-text space (512 for ViT-B/16).
      grid: patches per image side.
    """

    def __init__(
        self,
        *,
        image_size: int,
        width: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        embed_dim: int,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_features = width
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid = patch_grid(image_size, patch_size)
        self.dtype = dtype
        self.conv1 = nnx.Conv(
            3, width, (patch_size, patch_size), strides=patch_size, padding="VALID",
            use_bias=False, **kw,
        )  # fmt: skip
        scale = width**-0.5
        self.class_embedding = nnx.Param(_normal(scale)(rngs.params(), (width,), param_dtype))
        self.positional_embedding = nnx.Param(
            _normal(scale)(rngs.params(), (1 + self.grid**2, width), param_dtype)
        )
        self.ln_pre = nnx.LayerNorm(width, epsilon=1e-5, **kw)
        self.transformer = Transformer(width, depth, num_heads, **kw)
        self.ln_post = nnx.LayerNorm(width, epsilon=1e-5, **kw)
        self.proj = nnx.Param(_normal(scale)(rngs.params(), (width, embed_dim), param_dtype))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> tokens [B, 1 + g*g, width] after `ln_post` (CLS first).

        `train` is accepted for the backbone interface; there is no dropout or batch norm.
        """
        del train
        b, h, w, _ = x.shape
        side = self.grid * self.patch_size
        if (h, w) != (side, side):
            raise ValueError(
                f"CLIP image tower built for {side}x{side} images got {h}x{w}; rebuild it "
                f"with image_size={h} (convert with the option image_size={h})"
            )
        x = self.conv1(x.astype(self.dtype))
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)

    def project(self, tokens: jax.Array) -> jax.Array:
        """Tokens [..., width] -> [..., embed_dim] through `proj` (no normalisation)."""
        return tokens @ self.proj[...].astype(tokens.dtype)

    def encode_image(self, x: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] -> OpenAI's image features [B, embed_dim] (ln_post(CLS) @ proj)."""
        return self.project(self(x)[:, 0])


class TextTower(nnx.Module):
    """CLIP's text transformer (the unprefixed text part of a CLIP state dict).

    Attributes:
      context_length: the longest token sequence (77).
      embed_dim: width of the joint image-text space.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        num_heads: int,
        embed_dim: int,
        context_length: int = CONTEXT_LENGTH,
        vocab_size: int = VOCAB_SIZE,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.width = width
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.dtype = dtype
        self.token_embedding = nnx.Embed(vocab_size, width, embedding_init=_normal(0.02), **kw)
        self.positional_embedding = nnx.Param(
            _normal(0.01)(rngs.params(), (context_length, width), param_dtype)
        )
        self.transformer = Transformer(width, depth, num_heads, **kw)
        self.ln_final = nnx.LayerNorm(width, epsilon=1e-5, **kw)
        self.text_projection = nnx.Param(
            _normal(width**-0.5)(rngs.params(), (width, embed_dim), param_dtype)
        )

    def __call__(self, ids: jax.Array, *, train: bool = False) -> jax.Array:
        """Token ids [B, L] (L <= context_length) -> features [B, L, width] after `ln_final`.

        The mask is causal only (no padding mask), as in CLIP; because it is causal, a shorter
        L than 77 gives the same features at the positions it keeps.
        """
        del train
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(ids).astype(self.dtype)
        x = x + self.positional_embedding[...][:length].astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        return self.ln_final(self.transformer(x, causal))

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> text features [B, embed_dim] at each row's EOT (arg-max id)."""
        feats = self(ids)
        eot = feats[jnp.arange(ids.shape[0]), jnp.argmax(ids, axis=-1)]
        return eot @ self.text_projection[...].astype(eot.dtype)


def _sizes(table: dict, variant: str | None, given: dict[str, Any]) -> dict[str, Any]:
    if variant is not None and variant not in table:
        raise ValueError(f"unknown CLIP variant {variant!r}; valid: {', '.join(table)}")
    sizes = dict(table[variant]) if variant is not None else {}
    sizes |= {k: v for k, v in given.items() if v is not None}
    absent = [k for k in given if k not in sizes]
    if absent:
        raise ValueError(f"variant=None needs explicit {', '.join(absent)}")
    return sizes


def create(
    *,
    image_size: int = 224,
    variant: str | None = "ViT-B/16",
    width: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> ImageTower:
    """Build the image tower of a `variant` (a key of `VARIANTS`), or with explicit sizes.

    Explicit sizes override the variant's; with `variant=None` all five are required.
    """
    given = dict(
        width=width, depth=depth, num_heads=num_heads, patch_size=patch_size, embed_dim=embed_dim
    )
    return ImageTower(
        image_size=image_size,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **_sizes(VARIANTS, variant, given),
    )


def create_text(
    *,
    variant: str | None = "ViT-B/16",
    width: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    embed_dim: int | None = None,
    context_length: int = CONTEXT_LENGTH,
    vocab_size: int = VOCAB_SIZE,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> TextTower:
    """Build the text tower of a `variant` (a key of `TEXT_VARIANTS`), or with explicit sizes."""
    given = dict(width=width, depth=depth, num_heads=num_heads, embed_dim=embed_dim)
    return TextTower(
        context_length=context_length,
        vocab_size=vocab_size,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **_sizes(TEXT_VARIANTS, variant, given),
    )

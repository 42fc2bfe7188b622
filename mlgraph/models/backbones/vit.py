"""Vision Transformer with timm's layout and names (ViT-B/16, ViT-L/16) in Flax NNX.

The tree mirrors timm's `VisionTransformer`, so the converter's table is a renaming:
`blocks.3.attn.qkv.weight` -> `blocks/3/attn/qkv/kernel`, `patch_embed.proj.weight` ->
`patch_embed/proj/kernel`, `cls_token`, `pos_embed`, `norm`, `head`.

The block is the one SALGL's vendored timm builds (docs/salgl.md §1.1): pre-norm
(`x += attn(norm1(x))`, `x += mlp(norm2(x))`), one fused `qkv` Linear with bias, LayerNorm eps
1e-6, MLP ratio 4 with exact (erf) GELU, a CLS token and a learned position table for
1 + (S/p)^2 positions, no dropout or drop-path. The forward returns every token (CLS first)
after the final norm, which is what SALGL consumes.

`resize_pos_embed` resamples a position table to another grid exactly as torch's
`F.interpolate(mode="bicubic", align_corners=False)` does (timm's load-time resize), so that a
224-pixel checkpoint can be used at 448 or 576.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgraph.models.layers import dot_product_attention, patch_grid

# Standard sizes: width, depth, heads, patch.
VARIANTS: dict[str, dict[str, int]] = {
    "Ti/16": {"width": 192, "depth": 12, "num_heads": 3, "patch_size": 16},
    "S/16": {"width": 384, "depth": 12, "num_heads": 6, "patch_size": 16},
    "B/16": {"width": 768, "depth": 12, "num_heads": 12, "patch_size": 16},
    "B/32": {"width": 768, "depth": 12, "num_heads": 12, "patch_size": 32},
    "L/16": {"width": 1024, "depth": 24, "num_heads": 16, "patch_size": 16},
    "H/14": {"width": 1280, "depth": 32, "num_heads": 16, "patch_size": 14},
}

# timm's init: truncated normal (std 0.02) for Linear weights and the position table.
_dense_init = nnx.initializers.truncated_normal(0.02)


def _linear(cin, cout, *, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        cin, cout, kernel_init=_dense_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class Attention(nnx.Module):
    """timm `Attention`: fused `qkv` projection (with bias), softmax attention, `proj`."""

    def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.qkv = _linear(width, 3 * width, **kw)
        self.proj = _linear(width, width, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, N, D] -> [B, N, D]."""
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        return self.proj(dot_product_attention(q, k, v, self.num_heads))


class Mlp(nnx.Module):
    """timm `Mlp`: fc1 -> exact GELU -> fc2."""

    def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = _linear(width, hidden, **kw)
        self.fc2 = _linear(hidden, width, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, **kw)
        self.attn = Attention(width, num_heads, **kw)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, **kw)
        self.mlp = Mlp(width, int(width * mlp_ratio), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, N, D] -> [B, N, D]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> D features (a strided conv with bias, timm's `proj`)."""

    def __init__(self, patch_size: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = nnx.Conv(
            3,
            width,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, (H/p)*(W/p), D], patches in row-major (h outer) order."""
        y = self.proj(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class VisionTransformer(nnx.Module):
    """timm ViT returning all tokens after the final LayerNorm.

    Attributes:
      num_features: the token width D.
      grid: patches per image side (image_size // patch_size).
    """

    def __init__(
        self,
        *,
        image_size: int,
        width: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_features = width
        self.patch_size = patch_size
        self.grid = patch_grid(image_size, patch_size)
        self.dtype = dtype
        self.patch_embed = PatchEmbed(patch_size, width, **kw)
        key = rngs.params()
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(key, (1, 1, width), param_dtype))
        self.pos_embed = nnx.Param(
            _dense_init(rngs.params(), (1, 1 + self.grid**2, width), param_dtype)
        )
        self.blocks = nnx.List([Block(width, num_heads, mlp_ratio, **kw) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, **kw)
        self.head = _linear(width, num_classes, **kw) if num_classes else None

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> tokens [B, 1 + (H/p)*(W/p), D] (CLS first) after `norm`.

        `train` is accepted for the backbone interface; the ViT has no dropout or batch norm.
        """
        del train
        b, h, w, _ = x.shape
        if (h, w) != (self.grid * self.patch_size,) * 2:
            raise ValueError(
                f"ViT built for {self.grid * self.patch_size}x{self.grid * self.patch_size} "
                f"images got {h}x{w}; rebuild it with image_size={h} (the position table is "
                f"resized at conversion time with resize_pos_embed)"
            )
        x = self.patch_embed(x.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images -> class logits [B, num_classes] from the CLS token (timm's 'token' pooling)."""
        if self.head is None:
            raise ValueError("this ViT was built without a head (num_classes=None)")
        return self.head(self(x, train=train)[:, 0])


def create(
    *,
    image_size: int,
    variant: str | None = "B/16",
    width: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    mlp_ratio: float = 4.0,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> VisionTransformer:
    """Build a ViT of a standard `variant` (a key of `VARIANTS`), or with explicit sizes.

    `width`, `depth`, `num_heads` and `patch_size` override the variant's values (tests build
    tiny ViTs this way); with `variant=None` all four are required.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; valid: {', '.join(VARIANTS)}")
    sizes = dict(VARIANTS[variant]) if variant is not None else {}
    given = {"width": width, "depth": depth, "num_heads": num_heads, "patch_size": patch_size}
    sizes |= {k: v for k, v in given.items() if v is not None}
    absent = [k for k in given if k not in sizes]
    if absent:
        raise ValueError(f"variant=None needs explicit {', '.join(absent)}")
    return VisionTransformer(
        image_size=image_size,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **sizes,
    )


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """torch's cubic convolution coefficients for the taps at offsets -1, 0, 1, 2 from floor."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of torch's 1-D bicubic resampling (align_corners=False).

    Follows `upsample_bicubic2d`: source coordinate (i + 0.5) * in/out - 0.5 (not clamped
    for cubic), A = -0.75, taps at floor-1 .. floor+2 clamped to the border.
    """
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), weights[:, tap])
    return m


def resize_pos_embed(pos_embed: Any, new_grid: int | tuple[int, int]) -> np.ndarray:
    """Resample a ViT position table [1, 1 + g*g, D] to a new grid; the CLS row is kept.

    The grid part is resized with torch's bicubic kernel (A = -0.75, align_corners=False,
    no antialiasing), as timm does when a checkpoint is loaded at another image size.
    (`jax.image.resize` uses the Keys kernel with A = -0.5 and would not match.)

    Args:
      pos_embed: array [1, 1 + g*g, D] (square source grid, CLS first).
      new_grid: the target grid side, or (rows, cols).

    Returns:
      numpy array [1, 1 + rows*cols, D] of the input's dtype.
    """
    pe = np.asarray(pos_embed)
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1 + g*g, D], got shape {pe.shape}")
    g = math.isqrt(pe.shape[1] - 1)
    if g * g != pe.shape[1] - 1:
        raise ValueError(f"pos_embed has {pe.shape[1] - 1} grid positions, not a square")
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    grid = pe[0, 1:].astype(np.float64).reshape(g, g, -1)
    out = np.einsum(
        "ah,hwd,bw->abd", bicubic_matrix(g, rows), grid, bicubic_matrix(g, cols), optimize=True
    )
    out = out.reshape(1, rows * cols, -1).astype(pe.dtype)
    return np.concatenate([pe[:, :1], out], axis=1)

"""A small from-scratch CNN (conv-BN-ReLU stages) for the demo baseline and fast tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ConvBNReLU(nnx.Module):
    """3x3 conv (PyTorch padding 1), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            cin,
            cout,
            (3, 3),
            strides=stride,
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            cout, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class SimpleCNN(nnx.Module):
    """Stages of two conv blocks each; every stage after the first halves the resolution."""

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        blocks, cin = [], 3
        for w in widths:
            # Every stage (the stem too) halves the resolution: stride 2**len(widths) overall.
            blocks.append(ConvBNReLU(cin, w, 2, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            blocks.append(ConvBNReLU(w, w, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            cin = w
        self.blocks = nnx.List(blocks)
        self.num_features = widths[-1]

    def feature_map(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """[B, H, W, 3] -> [B, H / 2**stages, W / 2**stages, num_features]."""
        for block in self.blocks:
            x = block(x, train=train)
        return x

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Tokens [B, N, D]: the last feature map flattened row-major."""
        fmap = self.feature_map(x, train=train)
        return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])


def create(*, image_size: int, dtype=jnp.float32, rngs: nnx.Rngs, widths=(32, 64, 128, 256)):
    """Registry entry point; `image_size` is accepted for a uniform signature (any size works)."""
    del image_size
    return SimpleCNN(tuple(widths), dtype=dtype, rngs=rngs)

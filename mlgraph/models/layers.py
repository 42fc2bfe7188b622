"""Model parts shared across methods and backbones, written once: the multi-head attention core,
PyTorch-style initializers and Linear, and the per-class linear classifier.

* `dot_product_attention` is the softmax attention of torch's `nn.MultiheadAttention`, timm's
  ViT, OpenAI CLIP and HF BERT alike; each module keeps its own projections (and so its own
  parameter names for checkpoint conversion) and calls this core between them.
* `uniform_init`, `xavier_uniform` and `torch_linear` reproduce torch's default and
  `xavier_uniform_` draws on flax's [in, out] kernel layout.
* `ElementWiseLinear` is the per-class `Element_Wise_Layer` classifier of SSGRL, SALGL
  (docs/salgl.md §1.11) and Query2Label.
* `TorchBatchNorm` is batch norm with torch's running variance (the unbiased batch variance);
  under bfloat16 its training-mode backward is one float32 pass (`batch_norm_train`).
* `patch_grid` is the patch grid of a ViT-style backbone, or the image size it cannot take.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph.errors import ConfigError


def patch_grid(image_size: int, patch_size: int) -> int:
    """Patches per side of a ViT-style backbone at `image_size`.

    Raises:
      ConfigError: `image_size` is not a multiple of `patch_size` (the run's
        `config.image_size` named, with the sizes that fit).
    """
    if image_size % patch_size:
        below = image_size // patch_size * patch_size
        raise ConfigError(
            f"config.image_size={image_size}: the backbone cuts {patch_size}-pixel patches; "
            f"expected a multiple of {patch_size} (e.g. {max(below, patch_size)} or "
            f"{below + patch_size})"
        )
    return image_size // patch_size


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    *,
    mask: jax.Array | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    return_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
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
      return_probs: also return the attention probabilities [B, num_heads, Lq, Lk] float32
        (softmax over the keys, before dropout), the weights the output was computed with.

    Returns:
      [B, Lq, D] (before the output projection); with `return_probs`, (that, probabilities).
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
    weights = probs if dropout is None else dropout(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).reshape(b, lq, d)
    return (out, probs) if return_probs else out


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, dtype):
    """Training-mode batch norm over every axis of `x` but the last, as `nnx.BatchNorm`
    computes it (statistics in float32, E[x^2] - E[x]^2 clipped at 0; `scale` and `bias`
    rounded to `dtype` as its `promote_dtype` does, the rest in float32, the result in
    `dtype`). Returns (y, batch mean, biased batch variance); the statistics carry no gradient.

    Its backward computes the bias and scale gradients, sum(dy) and sum(dy * x_hat), in one
    float32 pass over dy and x, and dx from them. Autodiff of the forward instead sums dy in
    `dtype` apart from the other reduction: under bfloat16 that is a separate pass over each
    activation in the backbone's backward (98 unfused reduces in `salgl_coco`'s TPU step).
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
    axes = tuple(range(x.ndim - 1))
    out = x.dtype if dtype is None else dtype
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(axes)
    var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
    rstd = jax.lax.rsqrt(var + epsilon)
    scale = scale.astype(out).astype(xf.dtype)
    bias = bias.astype(out).astype(xf.dtype)
    y = ((xf - mean) * (rstd * scale) + bias).astype(out)
    stats = (jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))
    return (y, *stats), (x, mean, rstd, scale)


def _batch_norm_bwd(epsilon, dtype, residuals, cotangents):
    del epsilon, dtype
    x, mean, rstd, scale = residuals
    g = cotangents[0].astype(mean.dtype)  # the statistics' cotangents: stop_gradient'ed
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    x_hat = (x.astype(mean.dtype) - mean) * rstd
    d_bias, d_scale = g.sum(axes), (g * x_hat).sum(axes)
    dx = (scale * rstd) * (g - (d_bias + x_hat * d_scale) / n)
    return dx.astype(x.dtype), d_scale, d_bias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class TorchBatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` whose running variance follows torch's `BatchNorm2d`: in training mode
    it moves toward the batch variance with Bessel's correction, var x n / (n - 1) over the n
    values per channel, while the batch is still normalized by the biased one, as torch does
    (flax's own update takes the biased variance: with the 16 values per channel of a 2x2
    layer4 map at batch 4, its running variance moves 6 % less than torch's).

    With activations below float32 (`dtype=bfloat16`), training mode runs `batch_norm_train`,
    whose backward takes both parameter gradients in one float32 pass; flax's autodiff would
    sum the bias gradient in bfloat16 as a pass of its own (on a v5e chip, modelled: a one-block
    ResNet's step 11.36 -> 10.70 ms, `salgl_coco`'s 60.36 -> 58.56 ms; README, Accelerators).
    In float32 flax's autodiff is kept: its sums are float32 already, the one-pass backward
    models slower there (16.83 against 16.30 ms), and the gradients agree only to float32
    rounding, which SALGL's 32-step parity with the official loop cannot absorb (at its step 30
    a 1e-5 change of the parameters moves one gradient by 10 %).
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalize `x` (features last); in training mode also update the statistics."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average:
            return super().__call__(x, use_running_average=True)
        n = x.size // x.shape[-1]
        if self._one_pass_backward(x):
            y, mean, var = batch_norm_train(
                x, self.scale[...], self.bias[...], self.epsilon, self.dtype
            )
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * mean
            self.var[...] = m * self.var[...] + (1 - m) * var * (n / max(n - 1, 1))
            return y
        before = self.var[...]
        y = super().__call__(x, use_running_average=False)
        # flax stored m * before + (1 - m) * var; torch takes (1 - m) * var * n / (n - 1).
        kept = self.momentum * before
        self.var[...] = jax.lax.stop_gradient(kept + (self.var[...] - kept) * (n / max(n - 1, 1)))
        return y

    def _one_pass_backward(self, x: jax.Array) -> bool:
        """Whether training mode takes `batch_norm_train`: activations below float32, and the
        plain layer it implements (scale and bias, no cross-device axis name)."""
        reduced = jnp.dtype(self.dtype or x.dtype).itemsize < 4
        plain = self.axis_name is None and self.scale is not None and self.bias is not None
        return reduced and plain


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


# ---------------------------------------------------------------------------------------------
# The platform a program is traced for
# ---------------------------------------------------------------------------------------------
_TARGET: list[str] = []


def target_platform() -> str:
    """The platform the program being traced will run on: 'cpu', 'tpu' or 'gpu'.

    JAX's default backend, unless the trace is inside `compiling_for` (ahead-of-time
    compilation for a TPU slice or GPUs from a CPU host, `mlgraph.bench_compile`), where the
    default backend is the host's CPU but the program is the accelerator's. The CPU-only
    rewrites below (`conv_general_dilated`'s weight gradient, MobileNetV2's depthwise sums)
    are chosen by it at trace time.
    """
    return _TARGET[-1] if _TARGET else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace for `platform` ('cpu', 'tpu', 'gpu' or 'cuda') whatever JAX's default backend."""
    _TARGET.append("gpu" if platform in ("cuda", "rocm") else platform)
    try:
        yield
    finally:
        _TARGET.pop()


# ---------------------------------------------------------------------------------------------
# A residual stream XLA:CPU would recompute
# ---------------------------------------------------------------------------------------------
def _materialized(x: jax.Array) -> jax.Array:
    # XLA cannot fuse across a conditional whose predicate it cannot fold, so `x` is written
    # once and read by every consumer. Both branches return x's values (the second only when
    # its first element is NaN); identical branches would be folded away.
    first = x.reshape(-1)[0]
    return jax.lax.cond(first == first, lambda v: v, lambda v: v + 0.0, x)


def materialize_on_cpu(x: jax.Array) -> jax.Array:
    """`x` unchanged, kept in memory on CPU instead of being recomputed by its consumers.

    XLA:CPU's default fusion copies an elementwise result into each of its consumers, so a
    chain of residual blocks (`x = relu(f(x) + x)`) recomputes every earlier block's output in
    each block: R101's layer3 made fusions of 123 operands. Keeping `x` makes the R101 trunk's
    CPU train step much faster under XLA's default fusions, and its eval forward faster with
    YNNPACK for dots only. `jax.lax.optimization_barrier` does not prevent it (XLA:CPU
    removes barriers before fusing). Other platforms get `x` as it is
    (`jax.lax.platform_dependent`).
    """
    return jax.lax.platform_dependent(x, cpu=_materialized, default=lambda v: v)


# ---------------------------------------------------------------------------------------------
# Convolutions whose weight gradient XLA:CPU computes slowly
# ---------------------------------------------------------------------------------------------
_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_dw(lhs, rhs, strides, padding, precision):
    return jax.lax.conv_general_dilated(
        lhs, rhs, strides, padding, dimension_numbers=_NHWC, precision=precision
    )


def _conv_matmul_dw_fwd(lhs, rhs, strides, padding, precision):
    return _conv_matmul_dw(lhs, rhs, strides, padding, precision), (lhs, rhs)


def _conv_matmul_dw_bwd(strides, padding, precision, residuals, ct):
    lhs, rhs = residuals
    conv = lambda x: jax.lax.conv_general_dilated(  # noqa: E731
        x, rhs, strides, padding, dimension_numbers=_NHWC, precision=precision
    )
    d_lhs = jax.vjp(conv, lhs)[1](ct)[0]
    # dW[i, j] = Σ_{b,h,w} x_pad[b, s·h + i, s·w + j, :]ᵀ ct[b, h, w, :]: one matmul per kernel
    # position, which XLA:CPU runs several times faster than its weight-gradient convolution.
    kh, kw = rhs.shape[:2]
    (sh, sw), (ho, wo) = strides, ct.shape[1:3]
    x = jnp.pad(lhs, ((0, 0), padding[0], padding[1], (0, 0)))
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            window = x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
            cols.append(jnp.einsum("bhwc,bhwo->co", window, ct, precision=precision))
        rows.append(jnp.stack(cols))
    return d_lhs, jnp.stack(rows).astype(rhs.dtype)


_conv_matmul_dw.defvjp(_conv_matmul_dw_fwd, _conv_matmul_dw_bwd)


def _matmul_dw_is_faster(kernel_shape: tuple[int, ...]) -> bool:
    """Whether the per-position matmuls beat XLA:CPU's weight-gradient convolution for an HWIO
    kernel. Timed on ResNet-101's shapes (forward, input and weight gradient) under XLA's
    default fusions: the matmuls win for the 1x1 kernels and for the 7x7/2 stem on 3 channels;
    for the 3x3 kernels they are slower or even. With YNNPACK's elementwise fusions on as well
    (`LIBRARY_FUSION_TYPE_ELTWISE`, which mlgraph does not set), SALGL's train step without the
    matmuls stayed in YNNPACK's scheduler for many minutes without ending its first step
    (stopped there), so they stay."""
    kh, kw, cin = kernel_shape[:3]
    return kh * kw == 1 or cin <= 4


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    **kwargs,
):
    """`jax.lax.conv_general_dilated` (the `conv_general_dilated` of `nnx.Conv`) whose weight
    gradient, on CPU, for 1x1 kernels and a stem on RGB input, is a sum of one matmul per kernel
    position instead of XLA:CPU's weight-gradient convolution, which is several times slower
    than the forward pass for those shapes (`_matmul_dw_is_faster`: the 3x3 ones gain nothing).
    Same values up to float summation order; other kernels, other backends and grouped, dilated
    or non-NHWC convolutions take `jax.lax.conv_general_dilated` as it is."""
    plain = (
        target_platform() != "cpu"
        or feature_group_count != 1
        or batch_group_count != 1
        or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
        or kwargs.get("preferred_element_type") is not None
        or kwargs.get("out_sharding") is not None
        or lhs.ndim != 4
        or dimension_numbers != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        or not _matmul_dw_is_faster(rhs.shape)
    )
    if plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision,
            **{k: v for k, v in kwargs.items() if v is not None},
        )  # fmt: skip
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _conv_matmul_dw(lhs, rhs, tuple(window_strides), padding, precision)

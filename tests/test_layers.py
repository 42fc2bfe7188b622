"""The shared model parts of `mlgraph.models.layers`: the attention core against a numpy
reference (boolean and additive masks, a fully masked row) and the xavier-uniform kernel_init
as the transformer layers receive it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgraph.models import attention, layers

RNG = np.random.default_rng(0)


def _numpy_attention(q, k, v, heads, allowed):
    b, lq, d = q.shape
    hd = d // heads
    split = lambda x: x.reshape(b, x.shape[1], heads, hd)  # noqa: E731
    s = np.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(hd)
    s = np.where(allowed, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), split(v)).reshape(b, lq, d)


def test_attention_core_matches_numpy_with_boolean_and_additive_masks():
    q, k, v = (RNG.normal(size=(2, n, 12)).astype(np.float32) for n in (3, 5, 5))
    allowed = RNG.random((2, 1, 3, 5)) < 0.7
    allowed[..., 0] = True
    want = _numpy_attention(q, k, v, 3, allowed)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3)
    got = layers.dot_product_attention(*args, mask=jnp.asarray(allowed))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    additive = jnp.where(jnp.asarray(allowed), 0.0, -1e9)
    got = layers.dot_product_attention(*args, mask=additive)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # A row with no key allowed averages the values instead of giving NaN.
    none = layers.dot_product_attention(*args, mask=jnp.zeros((1, 1, 1, 5), bool))
    uniform = np.broadcast_to(v.mean(1, keepdims=True), q.shape)
    np.testing.assert_allclose(np.asarray(none), uniform, rtol=1e-5, atol=1e-6)


def test_kernel_init_reaches_every_transformer_matrix_but_the_in_projection():
    d, ffn = 32, 96
    layer = attention.TransformerDecoderLayer(
        d, 4, ffn, kernel_init=layers.xavier_uniform(), rngs=nnx.Rngs(0)
    )
    for kernel, bound in (
        (layer.self_attn.out_proj.kernel, math.sqrt(6 / (2 * d))),
        (layer.multihead_attn.out_proj.kernel, math.sqrt(6 / (2 * d))),
        (layer.linear1.kernel, math.sqrt(6 / (d + ffn))),
        (layer.linear2.kernel, math.sqrt(6 / (d + ffn))),
        (layer.multihead_attn.q_proj.kernel, math.sqrt(6 / (4 * d))),  # torch's fused [3D, D]
    ):
        w = np.abs(np.asarray(kernel[...]))
        assert bound * 0.9 < w.max() <= bound
    # The biases keep torch's Linear init, U(±1/sqrt(fan_in)).
    assert np.abs(np.asarray(layer.linear2.bias[...])).max() <= 1 / math.sqrt(ffn)


@pytest.mark.parametrize(
    "kernel,stride,pad,size,cin",
    [(7, 2, 3, 33, 3), (1, 1, 0, 14, 6), (1, 2, 0, 14, 6), (3, 1, 1, 9, 3), (3, 2, 1, 15, 3)],
)
def test_conv_with_matmul_weight_gradient_equals_lax(kernel, stride, pad, size, cin):
    """ResNet's convolutions (stem, 1x1, strided 1x1 shortcut; 3x3 and strided 3x3 on odd sizes,
    on RGB input so that they take the matmul path too): the same output and gradients as
    `jax.lax.conv_general_dilated`."""
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, 5)), jnp.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    pads = ((pad, pad), (pad, pad))

    def loss(conv):
        return lambda x, w: (conv(x, w, (stride, stride), pads, dimension_numbers=dn) ** 2).sum()

    want = jax.grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
    got = jax.grad(loss(layers.conv_general_dilated), argnums=(0, 1))(x, w)
    for a, b in zip(want, got, strict=True):
        # float32 sums in another order: relative to the gradient's scale
        assert np.abs(np.asarray(b) - np.asarray(a)).max() <= 1e-5 * np.abs(np.asarray(a)).max()
    out = layers.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "kernel,cin,matmul", [(1, 64, True), (7, 3, True), (3, 3, True), (3, 64, False)]
)
def test_matmul_weight_gradient_only_where_it_is_faster(kernel, cin, matmul):
    """1x1 kernels and the RGB stem take the matmul weight gradient; a 3x3 kernel on feature
    maps keeps XLA's convolution, which is as fast or faster there (`_matmul_dw_is_faster`)."""
    x = jnp.ones((1, 8, 8, cin), jnp.float32)
    w = jnp.ones((kernel, kernel, cin, 4), jnp.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    pads = ((kernel // 2, kernel // 2),) * 2
    grad = jax.grad(
        lambda w: layers.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=dn).sum()
    )
    jaxpr = str(jax.make_jaxpr(grad)(w))
    assert ("custom_vjp_call" in jaxpr) == matmul, jaxpr[:300]


def _largest_fusions(train: bool) -> list[int]:
    """Operand counts of the two largest fusions XLA:CPU compiles (with the test process's
    XLA_FLAGS: -O0 and `mlgraph.xla_options`') for a ResNet with a stage of 8 identity blocks:
    the train gradient, or the eval forward."""
    from mlgraph.models.backbones import resnet

    m = resnet.create(image_size=64, layers=(1, 1, 8, 1), width=16, rngs=nnx.Rngs(0))
    gdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = jnp.ones((2, 64, 64, 3))

    def loss(p, r, x):
        return jnp.mean(nnx.merge(gdef, p, r, copy=True)(x, train=True) ** 2)

    def forward(p, r, x):
        return nnx.merge(gdef, p, r, copy=True)(x, train=False)

    fn = jax.jit(jax.grad(loss) if train else forward)
    hlo = fn.lower(params, rest, x).compile().as_text()
    ops = [
        line.split(" fusion(", 1)[1].split("), kind")[0].count("%")
        for line in hlo.splitlines()
        if " fusion(" in line
    ]
    return sorted(ops)[-2:]


@pytest.mark.parametrize("train", [True, False])
def test_resnet_blocks_keep_their_output_instead_of_xla_recomputing_it(train, monkeypatch):
    # Without `materialize_on_cpu` XLA:CPU copies each block's output into every consumer, so
    # its fusions grow with depth: block k's reads the conv outputs and batch-norm parameters
    # (or running statistics) of all the blocks before it. The largest train fusion (49
    # operands) is not on the stream and is the same either way.
    kept = _largest_fusions(train)
    monkeypatch.setattr(layers, "materialize_on_cpu", lambda x: x)
    recomputed = _largest_fusions(train)
    assert recomputed[0] >= 25, recomputed
    assert kept[0] <= 16, kept


def test_materialize_on_cpu_keeps_values_and_gradients():
    x = jnp.asarray(RNG.standard_normal((3, 4)), jnp.float32).at[0, 1].set(-0.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.materialize_on_cpu)(x)), x)
    grad = jax.grad(lambda v: (layers.materialize_on_cpu(v * 2.0) ** 2).sum())(x)
    np.testing.assert_allclose(np.asarray(grad), 8.0 * np.asarray(x), rtol=1e-6)
    nan_first = x.at[0, 0].set(jnp.nan)
    got = np.asarray(jax.jit(layers.materialize_on_cpu)(nan_first))
    np.testing.assert_array_equal(got, np.asarray(nan_first))


def _flax_batch_norm(x, scale, bias, dtype):
    bn = nnx.BatchNorm(x.shape[-1], momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = scale, bias
    return bn, bn(x, use_running_average=False)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_torch_batch_norm_is_flaxs_forward_with_torchs_running_variance_and_one_pass_backward(
    dtype,
):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((4, 5, 6, 8)) * 3 + 1, dtype or jnp.float32)
    scale = jnp.asarray(rng.standard_normal(8) + 1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    bn = layers.TorchBatchNorm(8, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = scale, bias
    flax_bn, want = _flax_batch_norm(x, scale, bias, dtype)
    # The forward and the running mean are flax's, to the bit; the running variance moved
    # towards the unbiased batch variance: n / (n - 1) = 120 / 119 times flax's move.
    np.testing.assert_array_equal(np.asarray(bn(x)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), np.asarray(flax_bn.mean[...]))
    moved, flax_moved = bn.var[...] - 0.9, flax_bn.var[...] - 0.9
    np.testing.assert_allclose(np.asarray(moved / flax_moved), 120 / 119, rtol=1e-5)

    def loss(norm):
        return lambda x, s, b: (norm(x, s, b).astype(jnp.float32) * weights).sum()

    ours = jax.grad(
        loss(lambda x, s, b: layers.batch_norm_train(x, s, b, 1e-5, dtype)[0]), (0, 1, 2)
    )
    autodiff = jax.grad(loss(lambda x, s, b: _flax_batch_norm(x, s, b, dtype)[1]), (0, 1, 2))
    got, flax_grads = ours(x, scale, bias), autodiff(x, scale, bias)
    # The parameter gradients are the float32 sums over the (dtype) cotangent.
    g = np.asarray(weights.astype(dtype or jnp.float32), np.float64)
    xf = np.asarray(x, np.float64)
    x_hat = (xf - xf.mean((0, 1, 2))) / np.sqrt(xf.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(got[2]), g.sum((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), (g * x_hat).sum((0, 1, 2)), rtol=2e-5)
    scale_error = np.abs(np.asarray(flax_grads[1]) - (g * x_hat).sum((0, 1, 2))).max()
    if dtype is None:  # autodiff of flax's layer: the same gradients, to two float32 sums'
        for mine, theirs in zip(got, flax_grads, strict=True):  # rounding (8e-6 seen)
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=3e-5, atol=1e-5)
    else:  # autodiff rounds the parameter gradients to bfloat16; dx is bfloat16 either way
        assert scale_error > 1e-2, scale_error
        dx_error = np.abs(np.asarray(got[0], np.float32) - np.asarray(flax_grads[0], np.float32))
        assert dx_error.max() <= 0.02 * np.abs(np.asarray(flax_grads[0], np.float32)).max()


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_torch_batch_norm_takes_the_one_pass_backward_only_below_float32(dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 8)) * 2 - 1, dtype or jnp.float32)
    scale = jnp.asarray(rng.standard_normal(8) + 1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def layer_loss(layer):
        def loss(x, s, b):
            bn = layer(8, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
            bn.scale[...], bn.bias[...] = s, b
            return (bn(x, use_running_average=False).astype(jnp.float32) * weights).sum()

        return jax.grad(loss, (0, 1, 2))(x, scale, bias)

    def one_pass_loss(x, s, b):
        y = layers.batch_norm_train(x, s, b, 1e-5, dtype)[0]
        return (y.astype(jnp.float32) * weights).sum()

    got = layer_loss(layers.TorchBatchNorm)
    # float32: flax's autodiff, bit for bit (what the many-step parity tests measured);
    # bfloat16: `batch_norm_train`'s backward, bit for bit.
    want = (
        layer_loss(nnx.BatchNorm)
        if dtype is None
        else jax.grad(one_pass_loss, (0, 1, 2))(x, scale, bias)
    )
    for mine, theirs in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))

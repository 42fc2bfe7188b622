"""SALGL's parts against numpy references written from the equations of docs/salgl.md §1-§2.

Co-occurrence update (hard and soft, and on 8 simulated devices against 1), transition
matrices, adjacency sampling, the gated GNN, the per-class classifier, low-rank bilinear
attention (values and gradients of the folded form against the unfolded one), the post-norm
encoder layer, the sine position table, the entropy terms and ASL.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlgraph import losses, sharding
from mlgraph.models import attention, graph, layers

RNG = np.random.default_rng(0)


def _params(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every variable of `module` as float64 numpy, keyed by '/'-joined path."""
    flat = nnx.to_flat_state(nnx.state(module))
    return {"/".join(map(str, p)): np.asarray(v[...], np.float64) for p, v in flat}


def _random_module(build, seed: int, scale: float = 0.5) -> nnx.Module:
    """`build()` abstractly, then every variable random (biases too, which init at 0).

    Skipping the real initialisation saves its op-by-op compilation.
    """
    module = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module)):
        var.set_value(jnp.asarray(rng.normal(0, scale, var.shape), var.dtype))
    return module


def _labels(b: int, c: int, rng=RNG) -> np.ndarray:
    return (rng.random((b, c)) < 0.4).astype(np.float32)


def _scene_probs(b: int, k: int, rng=RNG) -> np.ndarray:
    s = rng.normal(0, 2, (b, k))
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------- co-occurrence update
def _numpy_update(p: np.ndarray, y: np.ndarray, soft: bool) -> np.ndarray:
    """Sample by sample, as the original loop: comatrix[argmax p_i] += y_i y_i^T (or p_ik *)."""
    k, c = p.shape[1], y.shape[1]
    out = np.zeros((k, c, c), np.float64)
    for i in range(len(p)):
        m = np.outer(y[i], y[i])
        if soft:
            out += p[i][:, None, None] * m[None]
        else:
            out[np.argmax(p[i])] += m
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_cooccurrence_update_matches_per_sample_loop(soft):
    p, y = _scene_probs(16, 4), _labels(16, 7)
    got = np.asarray(graph.cooccurrence_update(jnp.asarray(p), jnp.asarray(y), soft))
    want = _numpy_update(p, y, soft)
    if soft:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)  # integer counts, exact
        assert got.sum() == sum(y[i].sum() ** 2 for i in range(16))


def test_cooccurrence_update_hard_has_no_gradient_soft_has():
    p, y = jnp.asarray(_scene_probs(6, 3)), jnp.asarray(_labels(6, 5))
    f = lambda soft: lambda q: graph.cooccurrence_update(q, y, soft).sum()  # noqa: E731
    assert float(jnp.abs(jax.grad(f(False))(p)).sum()) == 0.0
    # d/dp[b, k] of sum_kij p[b, k] y_bi y_bj = (sum_i y_bi)^2, for every k.
    want = np.repeat((np.asarray(y).sum(1) ** 2)[:, None], 3, axis=1)
    np.testing.assert_allclose(np.asarray(jax.grad(f(True))(p)), want)


@pytest.mark.parametrize("soft", [False, True])
def test_cooccurrence_update_sharded_over_8_devices_equals_one_device(soft):
    assert jax.device_count() == 8, "tests/conftest.py sets JAX_NUM_CPU_DEVICES=8"
    mesh = sharding.make_mesh()  # the training loop's ('data',) mesh
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    p, y = _scene_probs(32, 5), _labels(32, 6)
    fn = lambda q, t: graph.cooccurrence_update(q, t, soft)  # noqa: E731
    sharded = jax.jit(fn, in_shardings=(data, data), out_shardings=repl)
    p_d, y_d = jax.device_put(p, data), jax.device_put(y, data)
    assert len(p_d.addressable_shards) == 8 and p_d.addressable_shards[0].data.shape == (4, 5)
    got = np.asarray(sharded(p_d, y_d))
    single = np.asarray(jax.jit(fn)(jnp.asarray(p), jnp.asarray(y)))
    want = _numpy_update(p, y, soft)
    if soft:
        np.testing.assert_allclose(got, single, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, single)
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------- transition matrices
def _counts(k: int, c: int) -> np.ndarray:
    """Symmetric counts as accumulated by training; label 2 never occurs in scene 1."""
    out = np.zeros((k, c, c), np.float32)
    for s in range(k):
        y = _labels(20, c)
        if s == 1:
            y[:, 2] = 0
        out[s] = y.T @ y
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("ignore_self", [False, True])
def test_comatrix_to_prob_all_flags(normalize, ignore_self):
    counts = _counts(3, 6)
    counts[0, 0, 1] += 3.0  # an asymmetric entry shows the transpose: P[i, j] = C[j, i] / C[i, i]
    got = np.asarray(graph.comatrix_to_prob(jnp.asarray(counts), normalize, ignore_self))
    want = np.zeros_like(counts, dtype=np.float64)
    for k in range(3):
        for i in range(6):
            for j in range(6):
                want[k, i, j] = counts[k, j, i] / (counts[k, i, i] + 1e-8)
            if ignore_self:
                want[k, i, i] = 0.0
            if normalize:
                want[k, i] /= want[k, i].sum() + 1e-8
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[1, 2], 0.0)  # an unseen label's row stays zero
    assert got[0, 1, 0] != got[0, 0, 1]
    if normalize:
        np.testing.assert_allclose(got[0].sum(-1), 1.0, rtol=1e-6)
    if not ignore_self and not normalize:
        np.testing.assert_allclose(np.diagonal(got[0]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_sample_adjacency(soft):
    probs = RNG.random((4, 5, 5)).astype(np.float32)
    p = _scene_probs(3, 4)
    got = np.asarray(graph.sample_adjacency(jnp.asarray(probs), jnp.asarray(p), soft))
    if soft:
        want = sum(p[:, k, None, None] * probs[k][None] for k in range(4))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, probs[np.argmax(p, -1)])


# -------------------------------------------------------------------------------- GGNN, classifier
def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _numpy_ggnn(prm: dict, h: np.ndarray, a: np.ndarray, steps: int, outmess: bool):
    def lin(name, x):
        return x @ prm[f"{name}/kernel"] + prm[f"{name}/bias"]

    for _ in range(steps):
        m = np.einsum("bij,bjd->bid", a, h)
        if outmess:
            m = np.concatenate([m, np.einsum("bij,bjd->bid", a.transpose(0, 2, 1), h)], -1)
        z = _sigmoid(lin("fc1_w", m) + lin("fc1_u", h))
        r = _sigmoid(lin("fc2_w", m) + lin("fc2_u", h))
        cand = np.tanh(lin("fc3_w", m) + lin("fc3_u", r * h))
        h = (1 - z) * h + z * cand
    return h


@pytest.mark.parametrize("outmess", [False, True])
def test_gated_gnn_matches_numpy(outmess):
    d, c = 6, 5
    g = _random_module(lambda: graph.GatedGNN(d, 2, outmess, rngs=nnx.Rngs(0)), 1)
    prm = _params(g)
    assert prm["fc1_w/kernel"].shape == (2 * d if outmess else d, d)
    h = RNG.normal(size=(2, c, d)).astype(np.float32)
    a = RNG.random((2, c, c)).astype(np.float32)
    a[:, 0, 1] = 3.0  # asymmetric: in- and out-messages differ
    got = np.asarray(g(jnp.asarray(h), jnp.asarray(a)))
    np.testing.assert_allclose(got, _numpy_ggnn(prm, h, a, 2, outmess), rtol=1e-5, atol=1e-6)
    # One step differs from two: the loop really runs num_steps times with shared weights.
    one = np.asarray(g.step(jnp.asarray(h), jnp.asarray(a)))
    np.testing.assert_allclose(one, _numpy_ggnn(prm, h, a, 1, outmess), rtol=1e-5, atol=1e-6)
    assert np.abs(one - got).max() > 1e-3
    g0 = _random_module(lambda: graph.GatedGNN(d, 0, outmess, rngs=nnx.Rngs(0)), 1)
    np.testing.assert_array_equal(np.asarray(g0(jnp.asarray(h), jnp.asarray(a))), h)


def test_element_wise_linear():
    layer = layers.ElementWiseLinear(4, 3, rngs=nnx.Rngs(0))
    w, b = np.asarray(layer.weight[...]), np.asarray(layer.bias[...])
    assert w.shape == (4, 3) and b.shape == (4,)
    assert np.abs(w).max() <= 1 / math.sqrt(3) and np.abs(b).max() > 0
    x = RNG.normal(size=(2, 4, 3)).astype(np.float32)
    want = (x * w[None]).sum(-1) + b
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-6)


# ----------------------------------------------------------------------------------- attention
def _unfolded_attention(prm, x, labels):
    """docs/salgl.md §1.6 literally, with the [B, C, N, A] hidden projection and both biases."""
    u = x @ prm["linear1/kernel"]  # [B, N, A]
    w = labels @ prm["linear2/kernel"]  # [C, A]
    z = np.tanh(u[:, None, :, :] * w[None, :, None, :])
    t = z @ prm["hidden_linear/kernel"] + prm["hidden_linear/bias"]
    t = (t @ prm["target_linear/kernel"] + prm["target_linear/bias"])[..., 0]
    e = np.exp(t - t.max(-1, keepdims=True))
    alpha = e / e.sum(-1, keepdims=True)
    return np.einsum("bcn,bnd->bcd", alpha, x), alpha


def test_low_rank_bilinear_attention_matches_unfolded_reference():
    d, e, a, b, n, c = 6, 5, 8, 2, 7, 4
    att = _random_module(lambda: attention.LowRankBilinearAttention(d, e, a, rngs=nnx.Rngs(0)), 2)
    prm = _params(att)
    assert abs(prm["target_linear/bias"]).max() > 0 and abs(prm["hidden_linear/bias"]).max() > 0
    x = RNG.normal(size=(b, n, d)).astype(np.float32)
    lab = RNG.normal(size=(c, e)).astype(np.float32)
    call = nnx.jit(lambda m, x, lab: m(x, lab))
    feats, alphas = call(att, jnp.asarray(x), jnp.asarray(lab))
    want_feats, want_alphas = _unfolded_attention(prm, x, lab)
    assert feats.shape == (b, c, d) and alphas.shape == (b, c, n)
    np.testing.assert_allclose(np.asarray(alphas), want_alphas, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=1e-5, atol=1e-6)
    # Per-image label embeddings [B, C, E] give the same result.
    feats_b, _ = call(att, jnp.asarray(x), jnp.broadcast_to(jnp.asarray(lab), (b, c, e)))
    np.testing.assert_allclose(np.asarray(feats_b), np.asarray(feats), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "class_chunk, per_image", [(8, False), (2, True)], ids=["one-chunk", "padded-chunks"]
)
def test_low_rank_bilinear_attention_gradients_equal_unfolded(class_chunk, per_image):
    """Folding is exact for training too: same gradients for all four Linears and the input,
    from the chunked custom backward pass (3 classes in chunks of 2: one padded class)."""
    d, e, a = 4, 3, 6
    att = _random_module(
        lambda: attention.LowRankBilinearAttention(
            d, e, a, class_chunk=class_chunk, rngs=nnx.Rngs(0)
        ),
        3,
    )
    x = jnp.asarray(RNG.normal(size=(2, 5, d)), jnp.float32)
    lab = jnp.asarray(RNG.normal(size=(3, e)), jnp.float32)
    if per_image:  # embeddings [B, C, E]: w has a batch axis, its gradient is not summed
        lab = lab[None] + jnp.asarray(RNG.normal(size=(2, 3, e)), jnp.float32)
    target = jnp.asarray(RNG.normal(size=(2, 3, d)), jnp.float32)

    def unfolded(m, x):
        u = m.linear1(x)
        w = m.linear2(lab)
        z = jnp.tanh(u[:, None] * (w if per_image else w[None])[:, :, None])
        t = m.target_linear(m.hidden_linear(z))[..., 0]
        return jnp.einsum("bcn,bnd->bcd", jax.nn.softmax(t, -1), x)

    def loss(fn):
        return lambda m, x: jnp.sum((fn(m, x) - target) ** 2)

    gf_m, gf_x = nnx.jit(nnx.grad(loss(lambda m, x: m(x, lab)[0]), argnums=(0, 1)))(att, x)
    gu_m, gu_x = nnx.jit(nnx.grad(loss(unfolded), argnums=(0, 1)))(att, x)
    np.testing.assert_allclose(np.asarray(gf_x), np.asarray(gu_x), rtol=1e-4, atol=1e-6)
    for (path, g1), (_, g2) in zip(nnx.to_flat_state(gf_m), nnx.to_flat_state(gu_m), strict=True):
        if path[-1] == "bias":
            # The biases before the softmax do not change it: their gradient is 0 (exactly
            # when folded, up to rounding when unfolded).
            assert float(np.abs(g1[...]).max()) == 0.0, path
            assert float(np.abs(g2[...]).max()) < 1e-5, path
            continue
        np.testing.assert_allclose(
            np.asarray(g1[...]), np.asarray(g2[...]), rtol=1e-4, atol=1e-6, err_msg=str(path)
        )


# ------------------------------------------------------------------------------- encoder layer
def _layer_norm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _numpy_encoder_layer(prm, x, pos, heads):
    def lin(name, v):
        return v @ prm[f"{name}/kernel"] + prm[f"{name}/bias"]

    b, n, d = x.shape
    hd = d // heads
    qk = x + pos
    q = lin("self_attn/q_proj", qk).reshape(b, n, heads, hd)
    k = lin("self_attn/k_proj", qk).reshape(b, n, heads, hd)
    v = lin("self_attn/v_proj", x).reshape(b, n, heads, hd)
    s = np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(hd), k)
    e = np.exp(s - s.max(-1, keepdims=True))
    att = np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v).reshape(b, n, d)
    x = _layer_norm(x + lin("self_attn/out_proj", att), prm["norm1/scale"], prm["norm1/bias"])
    y = lin("linear2", np.maximum(lin("linear1", x), 0))
    return _layer_norm(x + y, prm["norm2/scale"], prm["norm2/bias"])


def test_transformer_encoder_layer_matches_numpy_and_dropout_acts_in_training():
    d, heads, ffn, n = 8, 4, 12, 5
    layer = _random_module(
        lambda: attention.TransformerEncoderLayer(d, heads, ffn, 0.5, rngs=nnx.Rngs(0)), 4
    )
    prm = _params(layer)
    x = RNG.normal(size=(2, n, d)).astype(np.float32)
    pos = RNG.normal(size=(1, n, d)).astype(np.float32)
    # Jitted: one compilation is much cheaper than op-by-op dispatch on a loaded 2-core box.
    evaluate = nnx.jit(lambda m, x, p: m(x, p))
    train = nnx.jit(lambda m, x, k: m(x, train=True, rngs=nnx.Rngs(dropout=k)))
    got = np.asarray(evaluate(layer, jnp.asarray(x), jnp.asarray(pos)))
    np.testing.assert_allclose(got, _numpy_encoder_layer(prm, x, pos, heads), rtol=1e-5, atol=1e-5)
    no_pos = np.asarray(evaluate(layer, jnp.asarray(x), None))
    np.testing.assert_allclose(
        no_pos, _numpy_encoder_layer(prm, x, 0.0, heads), rtol=1e-5, atol=1e-5
    )
    t1 = np.asarray(train(layer, jnp.asarray(x), jax.random.key(1)))
    t2 = np.asarray(train(layer, jnp.asarray(x), jax.random.key(1)))
    t3 = np.asarray(train(layer, jnp.asarray(x), jax.random.key(2)))
    np.testing.assert_array_equal(t1, t2)
    assert np.abs(t1 - no_pos).max() > 1e-2
    assert np.abs(t1 - t3).max() > 1e-2


def test_multihead_attention_init_follows_torch():
    mha = attention.MultiheadAttention(16, 4, rngs=nnx.Rngs(0))
    bound = math.sqrt(6 / (16 + 48))  # xavier-uniform over the fused [3D, D] in_proj
    q = np.asarray(mha.q_proj.kernel[...])
    assert bound * 0.8 < np.abs(q).max() <= bound
    assert np.all(np.asarray(mha.q_proj.bias[...]) == 0)
    assert np.all(np.asarray(mha.out_proj.bias[...]) == 0)
    assert np.abs(np.asarray(mha.out_proj.kernel[...])).max() <= 1 / 4  # 1/sqrt(16)


def test_sine_position_encoding_formula():
    dim, h = 8, 3
    table = attention.sine_position_encoding(dim, h)
    assert table.shape == (h * h, dim) and table.dtype == np.float32
    f = dim // 2
    for row in range(h):
        for col in range(h):
            y = (row + 1) / (h + 1e-6) * 2 * math.pi
            x = (col + 1) / (h + 1e-6) * 2 * math.pi
            for ch in range(f):
                tau = 10000 ** (2 * (ch // 2) / f)
                trig = math.sin if ch % 2 == 0 else math.cos
                token = row * h + col  # row-major: h outer, w inner
                assert table[token, ch] == pytest.approx(trig(y / tau), abs=1e-6)
                assert table[token, f + ch] == pytest.approx(trig(x / tau), abs=1e-6)
    with pytest.raises(ValueError, match="dim must be even"):
        attention.sine_position_encoding(7, 2)


# ------------------------------------------------------------------------------------ losses
def test_entropy_terms_by_hand():
    p = jnp.asarray([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    h0 = -2 * 0.5 * math.log(0.5 + 1e-7)
    h1 = -math.log(1 + 1e-7)
    np.testing.assert_allclose(np.asarray(losses.entropy(p)), [h0, h1], rtol=1e-6, atol=1e-7)
    assert float(losses.sample_entropy(p)) == pytest.approx((h0 + h1) / 2, rel=1e-6)
    mean = [0.75, 0.25, 0.0]
    h_mean = -sum(q * math.log(q + 1e-7) for q in mean)
    h_max = -3 * (1 / 3) * math.log(1 / 3 + 1e-7)
    assert float(losses.batch_entropy(p)) == pytest.approx((h_max - h_mean) * 100, rel=1e-5)
    uniform = jnp.full((4, 3), 1 / 3)
    assert abs(float(losses.batch_entropy(uniform))) < 1e-4


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_asl_by_hand():
    logits = jnp.asarray([[0.0, 2.0], [-1.0, 3.0]])
    y = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
    # positives: log p (gamma_pos = 0); the negative: p^2 log(1 - p).
    terms = [
        math.log(0.5),
        _sig(2.0) ** 2 * math.log(1 - _sig(2.0)),
        math.log(_sig(-1.0)),
        math.log(_sig(3.0)),
    ]
    want = -sum(terms) / 2 / 2 * 1000
    assert float(losses.asl(logits, y)) == pytest.approx(want, rel=1e-5)
    # clip shifts the negative's probability: p_- = min(1 - p + 0.05, 1); w = (1 - p_-)^2.
    p_neg = min(1 - _sig(2.0) + 0.05, 1.0)
    clipped = terms[:]
    clipped[1] = (1 - p_neg) ** 2 * math.log(p_neg)
    assert float(losses.asl(logits, y, clip=0.05)) == pytest.approx(
        -sum(clipped) / 4 * 1000, rel=1e-5
    )
    # gamma_pos: positives weighted by (1 - p)^gamma_pos.
    pos_w = [(1 - _sig(0.0)) ** 1, 1.0, (1 - _sig(-1.0)) ** 1, (1 - _sig(3.0)) ** 1]
    weighted = [t * w for t, w in zip(terms, pos_w, strict=True)]
    assert float(losses.asl(logits, y, gamma_pos=1.0)) == pytest.approx(
        -sum(weighted) / 4 * 1000, rel=1e-5
    )
    # eps floors the probability: log(max(p, 1e-5)) for a hopeless positive.
    far = losses.asl(jnp.asarray([[-40.0]]), jnp.asarray([[1.0]]))
    assert float(far) == pytest.approx(-math.log(1e-5) * 1000, rel=1e-5)


def test_asl_focusing_weight_is_a_constant_for_the_gradient():
    x = jnp.asarray([[1.5]])
    y = jnp.asarray([[0.0]])
    p = _sig(1.5)
    # d/dx [-(p^2) log(1 - p) * 1000] with p^2 held fixed = p^2 * p * 1000.
    g = float(jax.grad(lambda v: losses.asl(v, y))(x)[0, 0])
    assert g == pytest.approx(p**2 * p * 1000, rel=1e-5)

"""Tests for the single-positive (SPML) losses, ROLE's initialisation, the APL pseudo-labelling
pass and the SPML mAP, against plain-numpy forms of the formulas of docs/scob_spml.md §1.5 and
§2."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlgraph import losses, metrics, pseudo_labels
from mlgraph.errors import ConfigError

EPS = 1e-5

# Hand-made probabilities and single-positive observed matrix, B = 3 images, C = 4 classes.
PROBS = np.array(
    [
        [0.90, 0.20, 0.05, 0.60],
        [0.30, 0.75, 0.40, 0.01],
        [0.50, 0.10, 0.97, 0.35],
    ]
)
OBSERVED = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
LABELS = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]], dtype=np.float32)
LOGITS = np.log(PROBS / (1 - PROBS)).astype(np.float32)
CFG = SimpleNamespace(ls_coef=0.1, expected_num_pos=1.5, alpha=0.2, beta=0.3)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _lpos(p):
    return -math.log(p + EPS)


def _lneg(p):
    return -math.log(1 - p + EPS)


def _loss_from_entries(entry, z, p):
    """sum_{b,c} entry(z_bc, p_bc) / (B C), with an explicit loop over the entries."""
    b, c = z.shape
    return sum(entry(z[i, j], p[i, j]) for i in range(b) for j in range(c)) / (b * c)


def _epr_reg(p, k):
    return (p.sum(axis=1).mean() - k) ** 2 / p.shape[1] ** 2


P = _sigmoid(LOGITS)  # what the losses see: the float32 logits' probabilities


def _close(value, expected):
    np.testing.assert_allclose(float(value), expected, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------------------------- losses


def test_an():
    ref = _loss_from_entries(lambda z, p: _lpos(p) if z == 1 else _lneg(p), OBSERVED, P)
    _close(losses.an(LOGITS, OBSERVED), ref)


def test_an_ls_swaps_the_smoothing_between_positives_and_unknowns():
    s = 0.1

    def entry(z, p):
        if z == 1:
            return (1 - s) * _lpos(p) + s * _lneg(p)
        return (1 - s) * _lneg(p) + s * _lpos(p)

    _close(losses.an_ls(LOGITS, OBSERVED, s), _loss_from_entries(entry, OBSERVED, P))
    _close(losses.an_ls(LOGITS, OBSERVED, 0.0), float(losses.an(LOGITS, OBSERVED)))


def test_wan_weighs_unknowns_by_one_over_c_minus_one():
    gamma = 1.0 / (4 - 1)
    ref = _loss_from_entries(lambda z, p: _lpos(p) if z == 1 else gamma * _lneg(p), OBSERVED, P)
    _close(losses.wan(LOGITS, OBSERVED), ref)
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.wan(LOGITS[:, :1], OBSERVED[:, :1])


def test_epr_ignores_unknowns_and_adds_its_regulariser():
    k = 1.5
    ref = _loss_from_entries(lambda z, p: _lpos(p) if z == 1 else 0.0, OBSERVED, P)
    ref += (P.sum() / 3 - k) ** 2 / 4**2
    _close(losses.epr(LOGITS, OBSERVED, k), ref)
    # With K at the batch's own expected count the regulariser vanishes, and what is left is
    # the positives' term alone: the unknowns add nothing to M.
    k_exact = float(P.sum(axis=1).mean())
    positives_only = sum(_lpos(P[i, j]) for i, j in zip(*np.nonzero(OBSERVED), strict=True)) / 12
    _close(losses.epr(LOGITS, OBSERVED, k_exact), positives_only)


def _entropy(p):
    return p * _lpos(p) + (1 - p) * _lneg(p)


def test_em_maximises_the_unknowns_entropy():
    alpha = 0.2
    ref = _loss_from_entries(lambda z, p: _lpos(p) if z == 1 else -alpha * _entropy(p), OBSERVED, P)
    _close(losses.em(LOGITS, OBSERVED, alpha), ref)


def test_em_apl_soft_targets_for_pseudo_negatives_and_minus_zero_unknown():
    alpha, beta = 0.2, 0.3
    z = np.array(
        [[1.0, -0.25, 0.0, -1.0], [-0.0, 1.0, -0.6, 0.0], [0.0, -0.01, 1.0, -0.0]],
        dtype=np.float32,
    )

    def entry(zv, p):
        if zv == 1:
            return _lpos(p)
        if zv == 0:  # -0.0 == 0: still unknown
            return -alpha * _entropy(p)
        s = -float(zv)
        return beta * (s * _lpos(p) + (1 - s) * _lneg(p))

    _close(losses.em_apl(LOGITS, z, alpha, beta), _loss_from_entries(entry, z, P))
    # -0.0 is read as unknown: the same loss as with +0.0 there, and as plain EM without
    # pseudo-negatives.
    unsigned = np.where(z == 0, np.float32(0.0), z)
    assert np.signbit(z).sum() > np.signbit(unsigned).sum()
    _close(
        losses.em_apl(LOGITS, z, alpha, beta), float(losses.em_apl(LOGITS, unsigned, alpha, beta))
    )
    _close(
        losses.em_apl(LOGITS, -0.0 * (OBSERVED == 0) + OBSERVED, alpha, beta),
        float(losses.em(LOGITS, OBSERVED, alpha)),
    )


def test_full_label_oracle_uses_the_true_labels():
    ref = _loss_from_entries(lambda y, p: _lpos(p) if y == 1 else _lneg(p), LABELS, P)
    _close(losses.full_bce(LOGITS, LABELS), ref)


def test_other_observed_values_contribute_nothing():
    # Cole's codes fill a zero matrix by z == 1 and z == 0 only; an observed negative (-1) is
    # outside the SPML setting and adds 0 (divided by the full B C all the same).
    z = OBSERVED.copy()
    z[0, 3] = -1
    ref = _loss_from_entries(
        lambda zv, p: _lpos(p) if zv == 1 else (_lneg(p) if zv == 0 else 0.0), z, P
    )
    _close(losses.an(LOGITS, z), ref)


# --------------------------------------------------------------------------------------- ROLE

PHI = np.array(
    [[2.0, -0.3, 0.1, 0.4], [-1.0, 1.5, -0.2, 0.0], [0.3, 0.2, 3.0, -2.5]], dtype=np.float32
)


def _role_reference(p, q, z, k):
    b, c = z.shape
    m = 0.0
    for i in range(b):
        for j in range(c):
            observed = z[i, j] * (_lpos(p[i, j]) + _lpos(q[i, j]))
            cross = (
                q[i, j] * _lpos(p[i, j])
                + (1 - q[i, j]) * _lneg(p[i, j])
                + p[i, j] * _lpos(q[i, j])
                + (1 - p[i, j]) * _lneg(q[i, j])
            )
            m += 0.5 * observed + 0.5 * cross
    return m / (b * c) + 0.5 * (_epr_reg(p, k) + _epr_reg(q, k))


def _role_gradients(p, q, z, k):
    """d role / d logits and d role / d Phi, derived by hand with sg(p), sg(q) held constant.

    With d l+(p)/dx = -p(1-p)/(p+eps) and d l-(p)/dx = p(1-p)/(1-p+eps) for p = sigmoid(x):
      dL/dx = [z l+' + q l+' + (1-q) l-'](p) / (2 B C) + (S_p - K) p(1-p) / (B C^2),
    S_p = (1/B) sum p, and the same with p and q swapped for Phi.
    """
    b, c = z.shape

    def grad(a, target):
        d = a * (1 - a)
        dpos, dneg = -d / (a + EPS), d / (1 - a + EPS)
        entries = (z * dpos + target * dpos + (1 - target) * dneg) / (2 * b * c)
        return entries + (a.sum() / b - k) * d / (b * c**2)

    return grad(p, q), grad(q, p)


def test_role_value():
    q = _sigmoid(PHI)
    _close(losses.role(LOGITS, OBSERVED, PHI, 1.5), _role_reference(P, q, OBSERVED, 1.5))


def _role_without_stop_gradients(x, phi, k=1.5):
    """ROLE with p and q as live targets of each other: what the stop-gradients must prevent."""
    p, q = jax.nn.sigmoid(x), jax.nn.sigmoid(phi)
    lp = lambda a: -jnp.log(a + EPS)
    ln = lambda a: -jnp.log(1 - a + EPS)
    m = 0.5 * OBSERVED * (lp(p) + lp(q))
    m += 0.5 * (q * lp(p) + (1 - q) * ln(p) + p * lp(q) + (1 - p) * ln(q))
    reg = 0.5 * ((p.sum(1).mean() - k) ** 2 + (q.sum(1).mean() - k) ** 2) / 16
    return m.mean() + reg


def test_role_gradients_stop_at_the_cross_targets():
    k = 1.5
    g_logits, g_phi = jax.grad(losses.role, argnums=(0, 2))(
        jnp.asarray(LOGITS), jnp.asarray(OBSERVED), jnp.asarray(PHI), k
    )
    ref_logits, ref_phi = _role_gradients(P, _sigmoid(PHI), OBSERVED, k)
    np.testing.assert_allclose(np.asarray(g_logits), ref_logits, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g_phi), ref_phi, rtol=1e-5, atol=1e-8)

    # The check has teeth: without the stop-gradients both gradients differ clearly (while the
    # value is the same).
    x, phi = jnp.asarray(LOGITS), jnp.asarray(PHI)
    _close(_role_without_stop_gradients(x, phi, k), float(losses.role(x, OBSERVED, phi, k)))
    full_logits, full_phi = jax.grad(_role_without_stop_gradients, argnums=(0, 1))(x, phi, k)
    assert np.abs(np.asarray(full_logits) - ref_logits).max() > 1e-3
    assert np.abs(np.asarray(full_phi) - ref_phi).max() > 1e-3


def test_role_estimator_gradient_has_no_path_back_to_the_classifier():
    # p enters d/dPhi only as the constant target sg(p) (the regulariser's q term has no p), so
    # differentiating the estimator's gradient w.r.t. the classifier's logits gives exactly 0;
    # without the stop-gradient it does not.
    def phi_grad_sum(x, loss):
        return jax.grad(loss, argnums=1)(x, jnp.asarray(PHI)).sum()

    role = lambda x, phi: losses.role(x, OBSERVED, phi, 1.5)
    x = jnp.asarray(LOGITS)
    assert not np.asarray(jax.grad(phi_grad_sum)(x, role)).any()
    assert np.abs(np.asarray(jax.grad(phi_grad_sum)(x, _role_without_stop_gradients))).min() > 1e-4


def test_role_init():
    z = np.zeros((400, 50), np.float32)
    z[np.arange(400), np.arange(400) % 50] = 1
    z[3, 7] = -1
    phi = np.asarray(losses.role_init(z, jax.random.key(0)))
    assert phi.shape == z.shape and phi.dtype == np.float32
    np.testing.assert_allclose(phi[z == 1], math.log(0.995 / 0.005), rtol=1e-6)
    np.testing.assert_allclose(phi[3, 7], math.log(0.005 / 0.995), rtol=1e-6)
    unknown = phi[z == 0]
    bound = math.log(0.6 / 0.4)
    assert unknown.min() >= -bound and unknown.max() <= bound
    # U[-b, b]: fills the interval and centres on 0 (19,599 draws).
    assert unknown.min() < -0.95 * bound and unknown.max() > 0.95 * bound
    assert abs(unknown.mean()) < 0.01 and abs(unknown.std() - bound / math.sqrt(3)) < 0.01
    np.testing.assert_array_equal(phi, np.asarray(losses.role_init(z, jax.random.key(0))))


# --------------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize(
    "name, direct",
    [
        ("an", lambda: losses.an(LOGITS, OBSERVED)),
        ("an_ls", lambda: losses.an_ls(LOGITS, OBSERVED, CFG.ls_coef)),
        ("wan", lambda: losses.wan(LOGITS, OBSERVED)),
        ("epr", lambda: losses.epr(LOGITS, OBSERVED, CFG.expected_num_pos)),
        ("role", lambda: losses.role(LOGITS, OBSERVED, PHI, CFG.expected_num_pos)),
        ("em", lambda: losses.em(LOGITS, OBSERVED, CFG.alpha)),
        ("em_apl", lambda: losses.em_apl(LOGITS, OBSERVED, CFG.alpha, CFG.beta)),
        ("full", lambda: losses.full_bce(LOGITS, LABELS)),
    ],
)
def test_dispatcher_jits_and_matches_each_loss(name, direct):
    fn = jax.jit(
        lambda x, z, y, phi: losses.spml_loss(name, x, z, labels=y, label_logits=phi, cfg=CFG)
    )
    _close(fn(LOGITS, OBSERVED, LABELS, PHI), float(direct()))


def test_dispatcher_errors():
    with pytest.raises(ConfigError, match=r"config\.loss\.name='bce'.*an, an_ls, wan, epr, role"):
        losses.spml_loss("bce", LOGITS, OBSERVED, cfg=CFG)
    with pytest.raises(ValueError, match="label_logits"):
        losses.spml_loss("role", LOGITS, OBSERVED, cfg=CFG)
    with pytest.raises(ValueError, match="labels"):
        losses.spml_loss("full", LOGITS, OBSERVED, cfg=CFG)
    with pytest.raises(ValueError, match="same shape"):
        losses.an(LOGITS, OBSERVED[:, :3])
    # Only the fields a loss uses are read: AN needs none.
    _close(losses.spml_loss("an", LOGITS, OBSERVED, cfg=None), float(losses.an(LOGITS, OBSERVED)))


# ---------------------------------------------------------------------------------------- APL


def test_apl_picks_the_lowest_unknowns_per_class():
    z = np.array(
        [
            [1, 0, 0],
            [0, 0, -0.2],
            [0, 1, 0],
            [0, 0, 0],
            [-0.05, 0, 0],
            [0, 0, 1],
        ],
        dtype=np.float32,
    )
    s = np.array(
        [
            [0.01, 0.30, 0.50],
            [0.40, 0.10, 0.01],
            [0.20, 0.05, 0.80],
            [0.20, 0.60, 0.35],
            [0.00, 0.25, 0.45],
            [0.30, 0.70, 0.02],
        ],
        dtype=np.float32,
    )
    before = z.copy()
    out = pseudo_labels.apl_pseudo_negatives(z, s, np.array([1, 3, 10]))
    expected = z.copy()
    # Class 0: the positive (0.01) and the pseudo-negative (0.00) score lowest but are not
    # candidates; rows 2 and 3 tie at 0.20 and the quota of 1 takes the lower row.
    expected[2, 0] = -0.20
    # Class 1: the three lowest unknowns (rows 1, 4, 0); the positive row 2 (0.05) is skipped.
    expected[[1, 4, 0], 1] = -s[[1, 4, 0], 1]
    # Class 2: a quota above the 4 unknowns takes all of them; row 1 keeps its -0.2.
    expected[[0, 2, 3, 4], 2] = -s[[0, 2, 3, 4], 2]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(z, before)  # the input is not modified


def test_apl_ties_by_row_and_zero_scores_stay_unknown():
    z = np.zeros((5, 1), np.float32)
    z[0, 0] = 1
    s = np.full((5, 1), 0.3, np.float32)
    out = pseudo_labels.apl_pseudo_negatives(z, s, np.array([2]))
    np.testing.assert_array_equal(out[:, 0], np.float32([1, -0.3, -0.3, 0, 0]))

    s[3, 0] = 0.0
    out = pseudo_labels.apl_pseudo_negatives(z, s, np.array([1]))
    assert out[3, 0] == 0 and np.signbit(out[3, 0])  # -0.0: picked but still unknown ...
    again = pseudo_labels.apl_pseudo_negatives(out, s, np.array([1]))
    assert again[3, 0] == 0 and (again[[1, 2, 4], 0] == 0).all()  # ... so picked again


def test_apl_matches_a_loop_reference_over_several_rounds():
    rng = np.random.default_rng(0)
    n, c = 60, 5
    z = np.zeros((n, c), np.float32)
    z[np.arange(n), rng.integers(0, c, n)] = 1
    quotas = pseudo_labels.apl_quotas(z, num_epochs=6, warmup=3, neg_proportion=0.9)
    for _ in range(4):  # rounds at epochs 3..6; scores with many ties
        s = (rng.integers(0, 8, (n, c)) / 8).astype(np.float32)
        out = pseudo_labels.apl_pseudo_negatives(z, s, quotas)
        ref = z.copy()
        for j in range(c):
            candidates = sorted((r for r in range(n) if z[r, j] == 0), key=lambda r: (s[r, j], r))
            for r in candidates[: quotas[j]]:
                ref[r, j] = -s[r, j]
        np.testing.assert_array_equal(out, ref)
        assert (out[z != 0] == z[z != 0]).all()  # positives and earlier labels kept
        z = out


def test_apl_quotas():
    z = np.zeros((30, 4), np.float32)
    z[:20, 0] = 1  # U = 10
    z[:7, 1] = 1  # U = 23
    z[:, 2] = 1  # U = 0
    z[0, 3] = 1  # U = 29
    np.testing.assert_array_equal(pseudo_labels.apl_quotas(z, 10, 5, 0.9), [1, 4, 0, 5])
    np.testing.assert_array_equal(pseudo_labels.apl_quotas(z, 7, 5, 0.9), [4, 10, 0, 13])
    np.testing.assert_array_equal(pseudo_labels.apl_quotas(z, 6, 5, 1.0), [10, 23, 0, 29])
    assert pseudo_labels.apl_quotas(z, 10, 5, 0.9).dtype == np.int64
    with pytest.raises(ValueError, match="num_epochs > warmup"):
        pseudo_labels.apl_quotas(z, 5, 5, 0.9)
    with pytest.raises(ValueError, match="neg_proportion"):
        pseudo_labels.apl_quotas(z, 10, 5, 1.5)


def test_apl_validation():
    z = np.zeros((3, 2), np.float32)
    s = np.full((3, 2), 0.5, np.float32)
    q = np.array([1, 1])
    with pytest.raises(ValueError, match="same shape"):
        pseudo_labels.apl_pseudo_negatives(z, s[:2], q)
    with pytest.raises(ValueError, match="2 integers"):
        pseudo_labels.apl_pseudo_negatives(z, s, np.array([1]))
    with pytest.raises(ValueError, match="non-negative"):
        pseudo_labels.apl_pseudo_negatives(z, s, np.array([1, -1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pseudo_labels.apl_pseudo_negatives(z, s * 3, q)
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pseudo_labels.apl_pseudo_negatives(z, s, q)


# ----------------------------------------------------------------------------------- spml_map


def _sklearn_spml_map(scores, labels):
    aps = [
        average_precision_score(labels[:, c], scores[:, c]) if labels[:, c].any() else 0.0
        for c in range(labels.shape[1])
    ]
    return 100.0 * float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spml_map_equals_sklearn_with_ties_and_empty_classes(seed):
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 6, (50, 7)) / 5).astype(np.float32)  # many ties
    labels = (rng.random((50, 7)) < 0.3).astype(np.int64)
    labels[:, 4] = 0  # a class without positives: AP 0, still averaged
    value = metrics.spml_map(scores, labels)
    assert value == pytest.approx(_sklearn_spml_map(scores, labels), abs=1e-10)
    # Ties matter: ranking them one by one (the old non-interpolated mode) gives another number.
    per_rank = metrics.average_precision(scores, labels, interpolated=False)
    assert 100 * np.nan_to_num(per_rank).mean() != pytest.approx(value, abs=1e-6)


def test_spml_map_without_ties_and_with_masks():
    rng = np.random.default_rng(3)
    scores = rng.random((40, 5))
    labels = (rng.random((40, 5)) < 0.4).astype(np.int64)
    labels[0] = 1  # every class has a positive
    assert metrics.spml_map(scores, labels) == pytest.approx(
        metrics.mean_average_precision(scores, labels, interpolated=False), abs=1e-10
    )
    # group_ties composes with the mask: sklearn on the kept entries.
    scores = np.round(scores, 1)
    mask = rng.random((40, 5)) < 0.7
    ap = metrics.average_precision(scores, labels, mask, interpolated=False, group_ties=True)
    for c in range(5):
        keep = mask[:, c]
        assert ap[c] == pytest.approx(
            average_precision_score(labels[keep, c], scores[keep, c]), abs=1e-12
        )

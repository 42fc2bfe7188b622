"""Multi-label classification losses: BCE, ASL, SALGL's entropy terms and the single-positive
(SPML) losses.

The classification losses take logits [B, C] and targets [B, C] in {0, 1} and return a scalar.
The SPML losses (Cole et al. 2021, Zhou et al. 2022) take logits [B, C] and *observed* targets
[B, C] in which 0 means unknown; see `spml_loss` below.

The `config.loss` field sets the methods share are declared here as frozen dataclasses
(`ClassificationLoss`, `SinglePositiveLoss`); a method's `Loss` (the protocol in
`mlgraph.models`) uses or extends one of them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mlgraph.errors import ConfigError


def bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy with logits, averaged over every (image, class) entry.

    Same as `torch.nn.BCEWithLogitsLoss()` (reduction 'mean'). Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    per_entry = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return per_entry.mean()


def asl(
    logits: jax.Array,
    targets: jax.Array,
    gamma_pos: float = 0.0,
    gamma_neg: float = 2.0,
    clip: float = 0.0,
    eps: float = 1e-5,
) -> jax.Array:
    """Asymmetric loss (ASL, `AsymmetricLossOptimized` with `disable_torch_grad_focal_loss`).

    With p = sigmoid(logit) and p_- = min(1 - p + clip, 1) (just 1 - p when clip = 0):
      l = y log(max(p, eps)) + (1 - y) log(max(p_-, eps)),
      w = (1 - p)^gamma_pos for positives and (1 - p_-)^gamma_neg for negatives,
    and the loss is -(sum of l * w) / B / C * 1000. The focusing weight w is a constant for the
    gradient (stop_gradient), as in the torch code's `no_grad` block. Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    p_neg = 1.0 - p
    if clip > 0:
        p_neg = jnp.minimum(p_neg + clip, 1.0)
    loss = y * jnp.log(jnp.maximum(p, eps)) + (1.0 - y) * jnp.log(jnp.maximum(p_neg, eps))
    if gamma_neg > 0 or gamma_pos > 0:
        base = 1.0 - p * y - p_neg * (1.0 - y)
        exponent = gamma_pos * y + gamma_neg * (1.0 - y)
        loss = loss * jax.lax.stop_gradient(jnp.power(base, exponent))
    b, c = logits.shape
    return -loss.sum() / b / c * 1000.0


LOSSES = ("asl", "bce")


@dataclasses.dataclass(frozen=True)
class ClassificationLoss:
    """`config.loss` of a method trained with `classification` (BCE or ASL on full labels)."""

    name: str = "bce"  # the loss: 'bce' or 'asl' (`LOSSES`)
    gamma_pos: float = 0.0  # ASL focusing of positives
    gamma_neg: float = 2.0  # ASL focusing of negatives
    clip: float = 0.0  # ASL probability margin of negatives; 0 = off
    eps: float = 1e-5  # ASL log clamp


def classification(logits: jax.Array, targets: jax.Array, loss_cfg) -> jax.Array:
    """The classification loss `loss_cfg.name` ('bce' or 'asl' with `loss_cfg`'s gammas, clip
    and eps) of logits [B, C] against 0/1 targets.

    Raises:
      ConfigError: for another name.
    """
    if loss_cfg.name == "bce":
        return bce(logits, targets)
    if loss_cfg.name == "asl":
        return asl(
            logits,
            targets,
            gamma_pos=loss_cfg.gamma_pos,
            gamma_neg=loss_cfg.gamma_neg,
            clip=loss_cfg.clip,
            eps=loss_cfg.eps,
        )
    raise ConfigError(f"config.loss.name={loss_cfg.name!r}: expected one of {', '.join(LOSSES)}")


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy along `axis`: -sum p log(p + 1e-7) (SALGL's `EntropyLoss`, unreduced)."""
    p = p.astype(jnp.float32)
    return -jnp.sum(p * jnp.log(p + 1e-7), axis=axis)


def sample_entropy(scene_probs: jax.Array) -> jax.Array:
    """Mean over images of the entropy of each image's scene distribution [B, K] -> scalar.

    Minimising it makes every image's scene assignment confident.
    """
    return entropy(scene_probs).mean()


def batch_entropy(scene_probs: jax.Array) -> jax.Array:
    """(H_max - H(mean_b p_b)) * 100 for scene probabilities [B, K] -> scalar.

    H_max is the entropy of the uniform distribution over the K scenes, computed with the same
    1e-7 offset as in the original (so it is log K up to ~1e-7 K). Minimising it pushes the
    batch's average scene distribution towards uniform. The mean runs over the batch given; the
    original used the per-GPU batch, a jitted data-parallel step passes the global one.
    """
    k = scene_probs.shape[-1]
    h_max = entropy(jnp.full((k,), 1.0 / k, jnp.float32))
    return (h_max - entropy(scene_probs.astype(jnp.float32).mean(axis=0))) * 100.0


# ---------------------------------------------------------------------------------------------
# Single-positive multi-label (SPML) losses, as in Cole et al.'s and Zhou et al.'s code.
#
# Notation shared by every function below: p = sigmoid(logits) in float32, eps = 1e-5,
#   l+(p) = -log(p + eps),   l-(p) = -log(1 - p + eps),
# and each loss is  L = sum_{b,c} M_bc / (B C) + R  for a per-entry matrix M and an optional
# regulariser R that is added without normalisation. Observed targets z [B, C]: z = 1 is the
# observed positive, z = 0 unknown. Like the reference codes, which fill a zero matrix by
# `z == 1` and `z == 0` and assert that nothing else occurs, an entry with any other value
# contributes 0 (em_apl adds the pseudo-negatives z < 0).
# ---------------------------------------------------------------------------------------------

SPML_EPS = 1e-5


def _probs(logits: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))


def _pos_log(p: jax.Array) -> jax.Array:
    """l+(p) = -log(p + eps)."""
    return -jnp.log(p + SPML_EPS)


def _neg_log(p: jax.Array) -> jax.Array:
    """l-(p) = -log(1 - p + eps)."""
    return -jnp.log(1.0 - p + SPML_EPS)


def _entry_mean(m: jax.Array) -> jax.Array:
    b, c = m.shape
    return m.sum() / (b * c)


def _expected_positive_reg(p: jax.Array, expected_num_pos: float) -> jax.Array:
    """((1/B) sum_b sum_c p_bc - K)^2 / C^2: the batch-mean number of predicted positives, pulled
    towards K."""
    return (p.sum(axis=1).mean() - expected_num_pos) ** 2 / p.shape[1] ** 2


def _check_pair(logits, targets, what: str) -> None:
    # Shapes are static, so this also runs (once, at trace time) under jit.
    if jnp.ndim(logits) != 2 or jnp.shape(targets) != jnp.shape(logits):
        raise ValueError(
            f"logits must be [B, C] and {what} the same shape; got {jnp.shape(logits)} and "
            f"{jnp.shape(targets)}"
        )


def _observed_matrix(observed: jax.Array, positive: jax.Array, unknown: jax.Array) -> jax.Array:
    """M with `positive` where z == 1, `unknown` where z == 0 and 0 elsewhere."""
    z = jnp.asarray(observed)
    return jnp.where(z == 1, positive, jnp.where(z == 0, unknown, 0.0))


def an(logits: jax.Array, observed: jax.Array) -> jax.Array:
    """Assume negative (AN): M = l+(p) for z = 1, l-(p) for z = 0 (every unknown is a negative)."""
    _check_pair(logits, observed, "observed")
    p = _probs(logits)
    return _entry_mean(_observed_matrix(observed, _pos_log(p), _neg_log(p)))


def an_ls(logits: jax.Array, observed: jax.Array, ls_coef: float = 0.1) -> jax.Array:
    """AN with label smoothing s = `ls_coef` on both kinds of entry:

    z = 1: M = (1 - s) l+(p) + s l-(p),    z = 0: M = (1 - s) l-(p) + s l+(p).
    """
    _check_pair(logits, observed, "observed")
    p = _probs(logits)
    pos, neg = _pos_log(p), _neg_log(p)
    return _entry_mean(
        _observed_matrix(
            observed, (1.0 - ls_coef) * pos + ls_coef * neg, (1.0 - ls_coef) * neg + ls_coef * pos
        )
    )


def wan(logits: jax.Array, observed: jax.Array) -> jax.Array:
    """Weak assume negative (WAN): M = l+(p) for z = 1 and gamma l-(p) for z = 0, with
    gamma = 1/(C - 1) (so the C - 1 assumed negatives of an image weigh as much as its positive).

    Raises:
      ValueError: for C < 2.
    """
    _check_pair(logits, observed, "observed")
    num_classes = jnp.shape(logits)[1]
    if num_classes < 2:
        raise ValueError(f"wan needs at least 2 classes (gamma = 1/(C-1)); got C={num_classes}")
    p = _probs(logits)
    return _entry_mean(_observed_matrix(observed, _pos_log(p), _neg_log(p) / (num_classes - 1)))


def epr(logits: jax.Array, observed: jax.Array, expected_num_pos: float) -> jax.Array:
    """Expected positive regularisation (EPR): M = l+(p) for z = 1 and 0 for the unknowns, plus

    R = ((1/B) sum_b sum_c p_bc - K)^2 / C^2,   K = `expected_num_pos`.
    """
    _check_pair(logits, observed, "observed")
    p = _probs(logits)
    m = _observed_matrix(observed, _pos_log(p), 0.0)
    return _entry_mean(m) + _expected_positive_reg(p, expected_num_pos)


def role(
    logits: jax.Array, observed: jax.Array, label_logits: jax.Array, expected_num_pos: float
) -> jax.Array:
    """Regularised online label estimation (ROLE) for the classifier's logits [B, C] and the label
    estimator's logits Phi [B, C] (the rows of the batch's examples), q = sigmoid(Phi):

      M = 1/2 [z l+(p) + z l+(q)]
        + 1/2 [sg(q) l+(p) + (1 - sg(q)) l-(p) + sg(p) l+(q) + (1 - sg(p)) l-(q)],
      R = 1/2 [((1/B) sum p - K)^2 + ((1/B) sum q - K)^2] / C^2,

    with sg = stop_gradient: each of p and q is the target of the other's cross-entropy, and is
    trained only through its own terms. The z terms apply where z == 1. The regulariser carries
    no stop-gradient: the p term trains the classifier and the q term the estimator.
    """
    _check_pair(logits, observed, "observed")
    _check_pair(logits, label_logits, "label_logits")
    p = _probs(logits)
    q = _probs(label_logits)
    p_target = jax.lax.stop_gradient(p)
    q_target = jax.lax.stop_gradient(q)
    observed_terms = _observed_matrix(observed, _pos_log(p) + _pos_log(q), 0.0)
    cross_terms = (
        q_target * _pos_log(p)
        + (1.0 - q_target) * _neg_log(p)
        + p_target * _pos_log(q)
        + (1.0 - p_target) * _neg_log(q)
    )
    reg = 0.5 * (
        _expected_positive_reg(p, expected_num_pos) + _expected_positive_reg(q, expected_num_pos)
    )
    return _entry_mean(0.5 * observed_terms + 0.5 * cross_terms) + reg


def _logit(prob: float) -> float:
    return math.log(prob / (1.0 - prob))


ROLE_INIT_UNKNOWN_BOUND = _logit(0.6)  # unknowns start at probabilities in [0.4, 0.6]
ROLE_INIT_POSITIVE = _logit(0.995)
ROLE_INIT_NEGATIVE = _logit(0.005)


def role_init(observed: jax.Array, rng: jax.Array) -> jax.Array:
    """Cole et al.'s initial label-estimator logits Phi [N, C] (float32) for the training split's
    observed matrix [N, C]:

      unknowns (z = 0): U[-logit(0.6), logit(0.6)) = U[-0.405, 0.405), drawn with the JAX key
      `rng`; observed positives (z = 1): logit(0.995) = 5.293; observed negatives (z = -1, never
      present in SPML): logit(0.005) = -5.293.
    """
    z = jnp.asarray(observed)
    if z.ndim != 2:
        raise ValueError(f"observed must be [N, C]; got shape {z.shape}")
    init = jax.random.uniform(
        rng,
        z.shape,
        jnp.float32,
        minval=-ROLE_INIT_UNKNOWN_BOUND,
        maxval=ROLE_INIT_UNKNOWN_BOUND,
    )
    init = jnp.where(z == -1, jnp.float32(ROLE_INIT_NEGATIVE), init)
    return jnp.where(z == 1, jnp.float32(ROLE_INIT_POSITIVE), init)


def _binary_entropy(p: jax.Array) -> jax.Array:
    """H(p) = p l+(p) + (1 - p) l-(p) (with the eps inside the logs, as in Zhou's code)."""
    return p * _pos_log(p) + (1.0 - p) * _neg_log(p)


def em(logits: jax.Array, observed: jax.Array, alpha: float) -> jax.Array:
    """Entropy maximisation (EM): M = l+(p) for z = 1 and -alpha H(p) for z = 0, so the unknowns
    are pushed towards p = 1/2 instead of towards 0, with weight alpha = `alpha`."""
    _check_pair(logits, observed, "observed")
    p = _probs(logits)
    return _entry_mean(_observed_matrix(observed, _pos_log(p), -alpha * _binary_entropy(p)))


def em_apl(logits: jax.Array, observed: jax.Array, alpha: float, beta: float) -> jax.Array:
    """EM with asymmetric pseudo-labels (EM+APL), for z in [-1, 1]:

      z = 1: M = l+(p);   z = 0: M = -alpha H(p) (as `em`);
      z < 0 (a pseudo-negative with frozen score s = -z): M = beta [s l+(p) + (1 - s) l-(p)],

    a soft BCE of weight beta = `beta` towards the prediction s the model made when the entry was
    pseudo-labelled (`mlgraph.pseudo_labels.apl_pseudo_negatives`). A pseudo-label of score 0.0
    is stored as -0.0, which equals 0, so such an entry stays unknown (as in Zhou's code).
    """
    _check_pair(logits, observed, "observed")
    p = _probs(logits)
    z = jnp.asarray(observed, jnp.float32)
    s = -z
    pseudo = beta * (s * _pos_log(p) + (1.0 - s) * _neg_log(p))
    m = jnp.where(z < 0, pseudo, _observed_matrix(z, _pos_log(p), -alpha * _binary_entropy(p)))
    return _entry_mean(m)


def full_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The full-label oracle: M = l+(p) where y = 1 and l-(p) where y = 0, on the true labels y.

    Unlike `bce` (torch's `BCEWithLogitsLoss`), it takes the logs of p + eps and 1 - p + eps, as
    the SPML codes do, so that it is the same loss as `an` when every positive is observed.
    """
    _check_pair(logits, labels, "labels")
    return an(logits, labels)


SPML_LOSSES = ("an", "an_ls", "wan", "epr", "role", "em", "em_apl", "full")


@dataclasses.dataclass(frozen=True)
class SinglePositiveLoss:
    """`config.loss` of a method trained with `spml_loss` on observed single positives
    (docs/scob_spml.md §2); each loss reads only its own fields."""

    # The loss, one of `SPML_LOSSES`; 'an' (every unknown a negative) is the protocol's
    # baseline and reads none of the fields below.
    name: str = "an"
    ls_coef: float = 0.1  # AN-LS's label smoothing s
    expected_num_pos: float = 1.5  # EPR and ROLE's K, positives per image (VOC 1.5, COCO 2.9)
    alpha: float = 0.2  # EM's entropy weight (Zhou: VOC 0.2, COCO 0.1, NUS 0.1)
    beta: float = 0.02  # EM+APL's pseudo-negative weight (Zhou: VOC 0.02, COCO 0.9, NUS 0.2)
    warmup_epochs: int = 5  # EM+APL: pseudo-labelling after each epoch from this one on
    neg_proportion: float = 0.9  # EM+APL: share of each class's unknowns made negative overall
    label_lr_mult: float = 10.0  # ROLE: the label estimator's learning rate / the network's


def spml_loss(
    name: str,
    logits: jax.Array,
    observed: jax.Array,
    *,
    labels: jax.Array | None = None,
    label_logits: jax.Array | None = None,
    cfg,
) -> jax.Array:
    """The SPML loss `name` of logits [B, C] against the observed targets [B, C] -> scalar.

    Names: 'an', 'an_ls', 'wan', 'epr', 'role', 'em', 'em_apl' and 'full' (the oracle
    `full_bce`, on `labels` instead of `observed`). 'role' also needs `label_logits`, the label
    estimator's logits for the batch's rows.

    `cfg` (`config.loss`) supplies the hyper-parameters; only the fields the loss uses are read:
      ls_coef:          s, the label-smoothing coefficient of 'an_ls' (Cole: 0.1);
      expected_num_pos: K, the expected number of positives per image of 'epr' and 'role'
                        (Cole: 1.5 VOC, 2.9 COCO, 1.9 NUS-WIDE, 31.4 CUB);
      alpha:            the weight of the unknowns' negative entropy in 'em' and 'em_apl'
                        (Zhou: 0.2 VOC, 0.1 COCO and NUS-WIDE, 0.01 CUB);
      beta:             the weight of the pseudo-negatives' soft BCE in 'em_apl'
                        (Zhou: 0.02 VOC, 0.9 COCO, 0.2 NUS-WIDE, 0.4 CUB).

    Raises:
      ConfigError: for an unknown name.
      ValueError: for 'full' without `labels`, 'role' without `label_logits`, or bad shapes.
    """
    if name == "an":
        return an(logits, observed)
    if name == "an_ls":
        return an_ls(logits, observed, cfg.ls_coef)
    if name == "wan":
        return wan(logits, observed)
    if name == "epr":
        return epr(logits, observed, cfg.expected_num_pos)
    if name == "role":
        if label_logits is None:
            raise ValueError("spml_loss('role') needs label_logits (the estimator's batch rows)")
        return role(logits, observed, label_logits, cfg.expected_num_pos)
    if name == "em":
        return em(logits, observed, cfg.alpha)
    if name == "em_apl":
        return em_apl(logits, observed, cfg.alpha, cfg.beta)
    if name == "full":
        if labels is None:
            raise ValueError("spml_loss('full') needs labels (the true label matrix)")
        return full_bce(logits, labels)
    raise ConfigError(f"config.loss.name={name!r}: expected one of {', '.join(SPML_LOSSES)}")


# ---------------------------------------------------------------------------------------------
# Scob (docs/scob_spml.md §3.4, §3.6). Scob's networks output probabilities, so these take p and q.
# ---------------------------------------------------------------------------------------------


def _scob_soft_bce(u: jax.Array, t: jax.Array) -> jax.Array:
    """Scob's `loss_bce`, averaged over the batch: -(1/C) sum_c [t log(u + eps) +
    (1 - t + eps) log(1 - u + eps)], the eps in the negative weight being Scob's quirk."""
    per_image = t * jnp.log(u + SPML_EPS) + (1.0 - t + SPML_EPS) * jnp.log(1.0 - u + SPML_EPS)
    return -per_image.mean(axis=1).mean()


def _scob_epr(u: jax.Array, observed: jax.Array, expected_num_pos: float) -> jax.Array:
    """Scob's `loss_epr`: the observed positives' -log(u + eps) / C averaged over the batch,
    plus ((1/B) sum_b sum_c u_bc - K)^2 / C^2."""
    positives = jnp.where(observed == 1, _pos_log(u), 0.0)
    return positives.mean(axis=1).mean() + _expected_positive_reg(u, expected_num_pos)


def scob_classification(
    probs: jax.Array, label_probs: jax.Array, observed: jax.Array, expected_num_pos: float
) -> jax.Array:
    """Scob's ROLE-style objective of the classifier's probabilities p [B, C] and the label
    estimator's q [B, C] (docs/scob_spml.md §3.4):

      L = 1/2 [BCE(p, sg(q)) + EPR(p) + BCE(q, sg(p)) + EPR(q)],

    BCE with the eps in its negative weight (`_scob_soft_bce`), EPR over the observed positives
    with K = `expected_num_pos` (Scob: 1.5 VOC, 3.9 COCO). Up to that eps, Cole's ROLE."""
    _check_pair(probs, observed, "observed")
    _check_pair(probs, label_probs, "label_probs")
    p = jnp.asarray(probs, jnp.float32)
    q = jnp.asarray(label_probs, jnp.float32)
    loss_p = _scob_soft_bce(p, jax.lax.stop_gradient(q)) + _scob_epr(p, observed, expected_num_pos)
    loss_q = _scob_soft_bce(q, jax.lax.stop_gradient(p)) + _scob_epr(q, observed, expected_num_pos)
    return 0.5 * (loss_p + loss_q)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) along the last axis (torch's F.normalize: zero stays zero)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, 1e-12)


def prototype_infonce(
    queries: jax.Array,
    keys: jax.Array,
    prototypes: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 1.0,
    exclude: jax.Array | None = None,
) -> jax.Array:
    """Scob's InfoNCE against class prototypes (`loss_contrastive_infonce`, docs/scob_spml.md §3.6).

    With u, k and P L2-normalised (a zero prototype stays zero), per image b:

      logits_b = [1 + cos(u_b, k_b), (1 + cos(u_b, P_c)) * weights_bc for c = 1..C] / tau,
      loss = mean_b cross-entropy(logits_b, 0).

    Args:
      queries: u [B, D]; keys: k [B, D] (the positives); prototypes: P [C, D].
      weights: [B, C], Scob's 1 - R[y_b, c]^2 (0 for the image's own class under the hard
        correlation: its logit is 0, still in the denominator).
      temperature: tau.
      exclude: optional boolean [B, C]: prototypes left out of the softmax (Scob's code never
        leaves any out; `exclude_own_prototype` leaves out each image's own class).
    """
    u = _l2_normalize(jnp.asarray(queries, jnp.float32))
    k = _l2_normalize(jnp.asarray(keys, jnp.float32))
    protos = _l2_normalize(jnp.asarray(prototypes, jnp.float32))
    positive = 1.0 + jnp.sum(u * k, axis=-1, keepdims=True)
    negative = (1.0 + u @ protos.T) * weights
    logits = jnp.concatenate([positive, negative], axis=1) / temperature
    if exclude is not None:
        keep = jnp.concatenate([jnp.ones_like(exclude[:, :1]), ~exclude], axis=1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])


# ---------------------------------------------------------------------------------------------
# SigRL's open-vocabulary objective (docs/sigrl.md §3.1)
# ---------------------------------------------------------------------------------------------
def ranking(
    scores: jax.Array, positive: jax.Array, negative: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """BiAM's `ranking_lossT` (margin 1), as SigRL and MKT train with it.

    For image n: r_n = Σ_{i∈P_n, j∈N_n} max(0, 1 + s_nj − s_ni) / (#{(i, j): 1 + s_nj − s_ni > 0}
    + 1e-8); the loss is the mean of r_n over the images (weighted by `weights`, e.g. 0 for the
    images SigRL drops from a batch). Images without a violated pair contribute 0 and still
    count in the mean.

    Args:
      scores: [B, C]; positive, negative: [B, C] bool (labels +1 and −1; 0 = neither).
      weights: [B] in {0, 1}; None = every image.
    """
    scores = scores.astype(jnp.float32)
    margin = 1.0 + scores[:, None, :] - scores[:, :, None]  # [B, i, j]: 1 + s_j - s_i
    pairs = positive[:, :, None] & negative[:, None, :]
    violated = pairs & (margin > 0)
    per_image = jnp.where(violated, margin, 0.0).sum((1, 2)) / (violated.sum((1, 2)) + 1e-8)
    if weights is None:
        return per_image.mean()
    return (per_image * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def l1_distillation(
    student: jax.Array, teacher: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """SigRL's distillation: the mean over images (weighted) and dimensions of |g − g_teacher|
    (torch's `F.l1_loss`, `OV/engine_nus.py`).

    |x| is differentiated as torch does, sign(x): 0 where the student's embedding equals the
    teacher's. It does at the start of training (the teacher is the student's own CLIP tower,
    unchanged until the first update with a non-zero learning rate), where `jnp.abs`'s
    derivative of 1 would push every embedding dimension the same way.
    """
    diff = student.astype(jnp.float32) - teacher.astype(jnp.float32)
    per_image = (diff * jax.lax.stop_gradient(jnp.sign(diff))).mean(-1)
    if weights is None:
        return per_image.mean()
    return (per_image * weights).sum() / jnp.maximum(weights.sum(), 1.0)

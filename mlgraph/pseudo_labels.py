"""Asymmetric pseudo-labelling (APL) of Zhou et al. 2022 for EM+APL, in numpy.

The observed matrix z [N, C] of the training split holds 1 for the observed positive, 0 for an
unknown entry and -s for a pseudo-negative whose model score was s when it was labelled
(`mlgraph.losses.em_apl` trains it towards s). After the training phase of every epoch
e >= warm-up (epochs counted 1..E), the trainer scores the whole training split and calls
`apl_pseudo_negatives` with the per-class quotas of `apl_quotas`; the new matrix must reach the
data pipeline before the next epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def apl_quotas(
    initial_observed: Any, num_epochs: int, warmup: int, neg_proportion: float
) -> np.ndarray:
    """Pseudo-negatives per class and per round: k_c = floor(neg_proportion * U_c / (E - warm-up)),
    int64 [C].

    U_c is the number of unknown entries (z == 0) of class c in `initial_observed` [N, C], the
    matrix at the *start* of training: the quota stays fixed while pseudo-labels accumulate. The
    product and the division run in float64 in that order, as Python floats do in Zhou's code.
    Rounds run at e = warm-up, ..., E, i.e. E - warm-up + 1 of them, so the last round may take
    the total past neg_proportion * U_c (it never takes more entries than are unknown).

    Raises:
      ValueError: for num_epochs <= warmup, neg_proportion outside [0, 1] or a non-2-D matrix.
    """
    z = np.asarray(initial_observed)
    if z.ndim != 2:
        raise ValueError(f"initial_observed must be [N, C]; got shape {z.shape}")
    if num_epochs <= warmup:
        raise ValueError(
            f"APL needs num_epochs > warmup (the quota divides by their difference); got "
            f"num_epochs={num_epochs}, warmup={warmup}"
        )
    if not 0.0 <= neg_proportion <= 1.0:
        raise ValueError(f"neg_proportion must be in [0, 1]; got {neg_proportion}")
    unknown = (z == 0).sum(axis=0)
    return np.floor(neg_proportion * unknown / (num_epochs - warmup)).astype(np.int64)


def apl_pseudo_negatives(observed: Any, scores: Any, quotas: Any) -> np.ndarray:
    """One APL round: a float32 copy of `observed` [N, C] (values in [-1, 1]) in which, for each
    class c, the `quotas[c]` lowest-scored entries among those still unknown (z == 0) become
    pseudo-negatives z = -score.

    `scores` [N, C] are the model's probabilities for the same rows. Positives and entries
    pseudo-labelled in earlier rounds are never picked. With fewer unknowns than the quota, all
    of them are taken. Ties are broken towards the lower row index (a stable sort by score; Zhou's
    code leaves the order of ties to an unstable sort over shuffled rows). A score of 0.0 is
    stored as -0.0, which equals 0, so that entry stays unknown and may be picked again, as in
    Zhou's code. The input arrays are not modified.

    Raises:
      ValueError: for mismatched shapes, observed values outside [-1, 1], scores outside [0, 1]
        or NaN, or quotas that are not C non-negative integers.
    """
    z = np.array(observed, dtype=np.float32)
    s = np.asarray(scores)
    quotas = np.asarray(quotas)
    if z.ndim != 2 or s.shape != z.shape:
        raise ValueError(
            f"observed must be [N, C] and scores the same shape; got {z.shape} and {s.shape}"
        )
    if quotas.shape != (z.shape[1],) or not np.issubdtype(quotas.dtype, np.integer):
        raise ValueError(f"quotas must be {z.shape[1]} integers; got {quotas.dtype} {quotas.shape}")
    if (quotas < 0).any():
        raise ValueError(f"quotas must be non-negative; got {quotas.tolist()}")
    if np.isnan(z).any() or (np.abs(z) > 1).any():
        raise ValueError("observed values must lie in [-1, 1]")
    # Both comparisons are False for NaN, so NaN (which has no rank) is refused too.
    if not ((s >= 0) & (s <= 1)).all():
        raise ValueError("scores must be probabilities in [0, 1] (and not NaN)")
    unknown = z == 0
    # Non-candidates sort after every candidate (scores are <= 1), so within each column the
    # first quota positions are the lowest-scored unknowns, ties in row order (stable sort).
    keyed = np.where(unknown, s.astype(np.float64), np.inf)
    order = np.argsort(keyed, axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(z.shape[0])[:, None], axis=0)
    picked = unknown & (rank < quotas[None, :])
    z[picked] = -s[picked]
    return z

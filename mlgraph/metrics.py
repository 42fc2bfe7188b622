"""Multi-label evaluation metrics as the graph-based papers report them (numpy, vectorized).

* `average_precision` / `mean_average_precision`: per-class VOC-2012-style AP (interpolated
  precision envelope) and its mean, in the form SALGL's official `VOCmAP(year='2012')` computes
  them (SSGRL and Query2Label too), with VOC "difficult" entries dropped through `mask`; with
  `interpolated=False`, ML-GCN's AP (the mean over positives of the precision at their rank).
* `precision_recall_curve`: the per-class curve that AP integrates (for plots).
* `spml_map`: the single-positive (SPML) papers' mAP: scikit-learn's non-interpolated AP per
  class (tied scores scored as one threshold), 0 for a class without positives, averaged over
  every class.
* `threshold_metrics`: CP, CR, CF1, OP, OR, OF1 of the prediction `score >= threshold` (the
  papers' "All" columns).
* `topk_metrics`: the same after zeroing every score outside each sample's top k (the papers'
  "Top-3" columns).
* `compute_all`: all of the above in one flat dict of plain Python floats, in percent.
* `zero_shot_map`, `overall_prf_at_k` and `zero_shot_metrics`: the zero-shot / open-vocabulary
  table of BiAM (`util_nus.py` `compute_AP`, `compute_F1(mode_F1='overall')`), which LESA, MKT
  and SigRL report on NUS-WIDE and Open Images: non-interpolated mAP with 0 for a class without
  positives, and micro ("overall") P, R, F1 of each image's top-K classes.

Conventions shared by every function:
* `scores` and `targets` are `[N, C]` (N samples, C classes); scores are probabilities
  (sigmoid outputs), targets are 0/1 (bool or numeric).
* `mask` is an optional boolean `[N, C]`; False drops that (sample, class) pair from everything
  computed for that class. It is the logical negation of the VOC `ignore.npy` matrix
  (1 = ignore), so pass `mask=(ignore != 1)`. Non-boolean masks are refused on purpose, because
  passing the ignore matrix itself would silently invert its meaning.
* Tied scores are ranked in ascending sample (or class) index order. The official code's order
  for ties is whatever its unstable sort gives, so with ties no implementation is "the" reference.
  The exception is `group_ties=True` (used by `spml_map`), which, like scikit-learn, treats a run
  of tied scores as one threshold and so does not depend on their order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = np.finfo(np.float64).eps
_THRESHOLD_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def _validate(scores: Any, targets: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check and convert inputs to (float64 scores, bool targets, bool mask), all [N, C]."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C]; got shape {scores.shape}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets shape {targets.shape} does not match scores shape {scores.shape}"
        )
    if scores.shape[1] == 0:
        raise ValueError(f"scores must have at least one class column; got shape {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == np.bool_):
        raise ValueError(f"scores must be numeric; got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; cannot rank them")
    if targets.dtype != np.bool_:
        bad = ~np.isin(targets, (0, 1))
        if bad.any():
            value = targets[bad].flat[0].item()
            raise ValueError(
                f"targets must contain only 0 and 1; found {value!r}. Express ignored or "
                "difficult entries through mask=False instead"
            )
        targets = targets == 1
    if mask is None:
        mask = np.ones(scores.shape, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != scores.shape:
            raise ValueError(f"mask shape {mask.shape} does not match scores shape {scores.shape}")
        if mask.dtype != np.bool_:
            raise ValueError(
                f"mask must be a boolean array (True = keep the entry); got dtype {mask.dtype}. "
                "For a VOC ignore matrix (1 = ignore) pass mask=(ignore != 1)"
            )
    return scores, targets, mask


def average_precision(
    scores: Any,
    targets: Any,
    mask: Any = None,
    *,
    interpolated: bool = True,
    group_ties: bool = False,
) -> np.ndarray:
    """Per-class average precision, VOC-2012 style (interpolated), as fractions in [0, 1].

    For each class the kept samples (mask True) are ranked by descending score; the precision
    envelope is taken from the right (the best precision at or below each rank) and
    AP = sum over recall steps of delta-recall x envelope precision. Equivalently: the mean,
    over the class's positives, of the maximum precision at or beyond that positive's rank.
    This is neither scikit-learn's `average_precision_score` (non-interpolated, never larger)
    nor the 11-point VOC-2007 metric.

    `interpolated=False` gives the non-interpolated AP of ML-GCN's `AveragePrecisionMeter` (and
    of scikit-learn without ties): the mean, over the positives, of the precision at the
    positive's own rank.

    `group_ties=True` scores every positive in a run of tied scores at the precision reached
    after the whole run, as a single threshold of a precision-recall curve would. With
    `interpolated=False` this is exactly scikit-learn's `average_precision_score`,
    sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, ties included.

    Args:
      scores: [N, C] scores, higher = more confident.
      targets: [N, C] 0/1 ground truth.
      mask: optional [N, C] bool; False drops the (sample, class) pair from that class's ranking.
      interpolated: the precision envelope (True) or the precision at each rank (False).
      group_ties: score tied entries together at the end of their run (True) or one by one in
        ascending sample order (False).

    Returns:
      float64 [C]; NaN for a class with no positive among its kept samples (the official code
      would report 0 for such a class, which then drags the mean down).
    """
    precision, hits, _, _ = _ranked_precision(scores, targets, mask, group_ties)
    if interpolated:
        precision = _envelope(precision)
    n_pos = hits.sum(axis=0)
    total = (precision * hits).sum(axis=0)
    return np.divide(total, n_pos, out=np.full(total.shape, np.nan), where=n_pos > 0)


def _envelope(precision: np.ndarray) -> np.ndarray:
    """The interpolated precision [N, C]: at each rank, the best precision at or below it."""
    return np.flip(np.maximum.accumulate(np.flip(precision, axis=0), axis=0), axis=0)


def _ranked_precision(
    scores: Any, targets: Any, mask: Any, group_ties: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every class's ranking at once: (precision [N, C] at each rank, hits [N, C] (a kept
    positive at that rank), kept [N, C] (a kept entry at that rank), tp [N, C] (kept positives
    down to that rank)), with rank r of class c the r-th highest score of column c (ties in
    ascending sample order)."""
    scores, targets, mask = _validate(scores, targets, mask)
    # One stable sort per column ranks every class at once; masked entries stay in place but
    # count neither as hits nor as ranks, so they cannot change any kept entry's precision.
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(targets & mask, order, axis=0)
    kept = np.take_along_axis(mask, order, axis=0)
    tp = np.cumsum(hits, axis=0, dtype=np.float64)
    ranks = np.cumsum(kept, axis=0, dtype=np.float64)
    # A masked row's precision repeats the previous kept row's (or 0 before any), so it adds no
    # new value to the envelope of any positive below it.
    precision = np.divide(tp, ranks, out=np.zeros_like(tp), where=ranks > 0)
    if group_ties:
        # Each rank takes the precision of the last rank of its run of equal scores (the run's
        # end: the first rank at or below it whose successor scores differently).
        ranked = np.take_along_axis(scores, order, axis=0)
        n = ranked.shape[0]
        run_end = np.ones(ranked.shape, dtype=bool)
        run_end[:-1] = ranked[1:] != ranked[:-1]
        end_rank = np.where(run_end, np.arange(n)[:, None], n)
        end_rank = np.flip(np.minimum.accumulate(np.flip(end_rank, axis=0), axis=0), axis=0)
        precision = np.take_along_axis(precision, end_rank, axis=0)
    return precision, hits, kept, tp


def precision_recall_curve(
    scores: Any, targets: Any, mask: Any = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per class, the precision-recall curve behind `average_precision`: (recall, precision,
    interpolated precision) at each rank of its kept samples (mask True), highest score
    first, ties in ascending sample order.

    recall[r] = kept positives down to rank r / all kept positives, precision[r] = kept
    positives down to rank r / r; the interpolated precision is the envelope from the right
    (the best precision at or below the rank), so the class's AP is the mean of the
    interpolated precision at the ranks where recall grows (`average_precision`'s definition).
    A class without positives has recall 0 throughout.

    Returns:
      One (recall, precision, interpolated) triple of float64 [N_c] arrays per class column,
      N_c the class's kept samples.
    """
    precision, hits, kept, tp = _ranked_precision(scores, targets, mask)
    envelope = _envelope(precision)
    n_pos = np.maximum(hits.sum(axis=0), 1)
    out = []
    for c in range(precision.shape[1]):
        rows = kept[:, c]
        out.append((tp[rows, c] / n_pos[c], precision[rows, c], envelope[rows, c]))
    return out


def mean_average_precision(
    scores: Any, targets: Any, mask: Any = None, *, interpolated: bool = True
) -> float:
    """Mean of `average_precision` over the classes that have at least one positive, in percent.

    Classes with no positive (after masking) have undefined AP and are left out of the mean,
    rather than counted as 0 as the official SALGL code does; on the standard COCO, VOC 2007
    and NUS-WIDE test splits every class has positives, so the two agree there.

    Raises:
      ValueError: if no class has a positive, since the mean is then undefined.
    """
    ap = average_precision(scores, targets, mask, interpolated=interpolated)
    defined = ~np.isnan(ap)
    if not defined.any():
        raise ValueError(
            "mean_average_precision: no class has a positive target (after masking); "
            "mAP is undefined"
        )
    return float(100.0 * ap[defined].mean())


def spml_map(scores: Any, labels: Any, mask: Any = None) -> float:
    """The SPML papers' mAP (Cole et al. 2021 and those after them), in percent.

    AP_c = scikit-learn's `average_precision_score` of class c's scores against its 0/1 labels:
    sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, non-interpolated, with tied
    scores forming one threshold. A class with no positive gets AP_c = 0 and still counts:
    mAP = 100 * (1/C) sum_c AP_c over all C classes. (`mean_average_precision` instead leaves
    such classes out.)

    Args:
      scores: [N, C] scores, higher = more confident (the probabilities p).
      labels: [N, C] clean 0/1 labels.
      mask: optional [N, C] bool, True where an entry counts (VOC's difficult pairs are False).
    """
    ap = average_precision(scores, labels, mask, interpolated=False, group_ties=True)
    return float(100.0 * np.nan_to_num(ap, nan=0.0).mean())


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0 (the official code yields 0/0 = NaN there)."""
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def threshold_metrics(
    scores: Any, targets: Any, threshold: float = 0.5, mask: Any = None
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (percent) of the prediction `score >= threshold`.

    Per class c over the kept entries: gt_c positives, pd_c predicted positives, tp_c hits.
    * OP = sum tp / sum pd, OR = sum tp / sum gt, OF1 their harmonic mean. These are computed
      from the raw counts; an empty denominator gives NaN (no prediction at all: OP; no
      positive at all: OR).
    * Then tp, pd and gt are clamped to at least float64 eps, and CP = mean_c tp_c / pd_c,
      CR = mean_c tp_c / gt_c, CF1 = 2 CP CR / (CP + CR): the harmonic mean of the averaged
      precision and recall, not the mean of per-class F1s.

    Quirk, kept on purpose because it is the definition behind the papers' numbers: the eps
    clamp makes a never-predicted class count as precision eps/eps = 1 in CP (and a class
    with no positives count as recall 1 in CR).

    F1 values are 0 when precision and recall are both 0 (the official code gives NaN there).
    """
    scores, targets, mask = _validate(scores, targets, mask)
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold}")
    predicted = (scores >= threshold) & mask
    positive = targets & mask
    tp = (predicted & positive).sum(axis=0).astype(np.float64)
    pd = predicted.sum(axis=0).astype(np.float64)
    gt = positive.sum(axis=0).astype(np.float64)

    op = tp.sum() / pd.sum() if pd.sum() > 0 else float("nan")
    or_ = tp.sum() / gt.sum() if gt.sum() > 0 else float("nan")
    tp, pd, gt = np.maximum(tp, _EPS), np.maximum(pd, _EPS), np.maximum(gt, _EPS)
    cp = float(np.mean(tp / pd))
    cr = float(np.mean(tp / gt))
    values = (cp, cr, _f1(cp, cr), op, or_, _f1(op, or_))
    return {key: float(100.0 * v) for key, v in zip(_THRESHOLD_KEYS, values, strict=True)}


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")


def _topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool [N, C], True at each row's top min(k, C) scores; ties go to the lower class index."""
    _check_k(k)
    order = np.argsort(-scores, axis=1, kind="stable")
    keep = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    return keep


def topk_scores(scores: Any, k: int = 3) -> np.ndarray:
    """A float64 copy of `scores` [N, C] with every entry outside its row's top k set to 0.

    Ties are broken towards the lower class index. The input is never modified.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C]; got shape {scores.shape}")
    scores = scores.astype(np.float64)
    return np.where(_topk_mask(scores, k), scores, 0.0)


def topk_metrics(
    scores: Any, targets: Any, k: int = 3, threshold: float = 0.5, mask: Any = None
) -> dict[str, float]:
    """`threshold_metrics` after keeping only each sample's top-k scores (`topk_scores`).

    The top k are chosen before the mask is applied, as in the official code, so a masked
    entry can still take one of a sample's k slots. Keys carry the suffix `_top{k}`
    (`CP_top3`, ...). The input array is not modified.
    """
    _validate(scores, targets, mask)
    kept = topk_scores(scores, k)
    metrics = threshold_metrics(kept, targets, threshold=threshold, mask=mask)
    return {f"{key}_top{k}": value for key, value in metrics.items()}


THRESHOLDED = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def metric_names(topk: int | None = 3) -> list[str]:
    """The keys of `compute_all(..., topk=topk)`, in order."""
    names = ["mAP", "mAP_noninterp", "spml_mAP", *THRESHOLDED]
    return names if topk is None else names + [f"{n}_top{topk}" for n in THRESHOLDED]


def compute_all(
    scores: Any,
    targets: Any,
    mask: Any = None,
    threshold: float = 0.5,
    topk: int | None = 3,
) -> dict[str, float]:
    """Every reported metric in one flat dict of plain Python floats, all in percent.

    Keys: `mAP` (interpolated: SALGL, SSGRL, Q2L), `mAP_noninterp` (ML-GCN's), `spml_mAP`
    (the single-positive papers': scikit-learn's AP, 0 for a class without positives), `CP`, `CR`,
    `CF1`, `OP`, `OR`, `OF1` and, unless `topk` is None, the same six with the suffix
    `_top{topk}`. See the individual functions for the definitions.
    """
    result = {
        "mAP": mean_average_precision(scores, targets, mask),
        "mAP_noninterp": mean_average_precision(scores, targets, mask, interpolated=False),
        "spml_mAP": spml_map(scores, targets, mask),
    }
    result.update(threshold_metrics(scores, targets, threshold=threshold, mask=mask))
    if topk is not None:
        result.update(topk_metrics(scores, targets, k=topk, threshold=threshold, mask=mask))
    return result


# ---------------------------------------------------------------- zero-shot (BiAM) table

ZERO_SHOT_KS = (3, 5)


def zero_shot_map(scores: Any, targets: Any, mask: Any = None) -> float:
    """BiAM's zero-shot mAP (`compute_AP` of its `util_nus.py`, then the mean), in percent.

    Per class: the kept entries (mask True; BiAM keeps the entries whose label is +1 or -1 and
    drops the unknown 0s) are ranked by descending score, and AP_c = (1 / #pos) sum_k
    prec@k * rel_k, the precision at each positive's own rank (non-interpolated; this is
    `average_precision(..., interpolated=False)`). A class with no kept positive gets AP_c = 0
    and still counts: mAP = 100 * (1/C) sum_c AP_c over all C classes, which lowers the GZSL
    number on NUS-WIDE, where some of the 1006 classes have no positive test image.

    Ties: mlgraph ranks tied scores in ascending sample order (a stable sort), which is what
    BiAM's `prediction.sort(descending=True)` gives with `stable=True`. BiAM itself uses the
    default unstable (CUDA) sort, whose order for ties is unspecified, so with tied scores its
    AP may differ from this one (tied positives are not grouped, unlike `spml_map`).

    Args:
      scores: [N, C] scores, higher = more confident.
      targets: [N, C] 0/1 ground truth (BiAM's label == 1).
      mask: optional [N, C] bool, True where the label is known (BiAM's |label| == 1).

    Returns:
      The mAP in percent, a plain Python float.
    """
    ap = average_precision(scores, targets, mask, interpolated=False)
    return float(100.0 * np.nan_to_num(ap, nan=0.0).mean())


def overall_prf_at_k(scores: Any, targets: Any, k: int = 3, mask: Any = None) -> dict[str, float]:
    """BiAM's "overall" (micro) precision, recall and F1 of each image's top-k classes, in percent.

    Every image predicts its k highest-scoring classes (ties go to the lower class index; BiAM's
    `torch.topk` leaves their choice unspecified). Over the whole matrix:
    TP = #(predicted and positive), P = TP / #predicted = TP / (N * k), R = TP / #positives,
    F1 = 2 P R / (P + R), 0 when P + R = 0 (BiAM: 0/0 = NaN).

    As in BiAM, an entry that is not a positive (target 0, or mask False: BiAM's labels -1 and 0
    are both "not 1") still takes one of its image's k slots, and images without any positive
    are kept, so they add k predictions each to the precision's denominator. A masked entry is
    never a positive, whatever its target. If k exceeds C, every class is predicted and
    #predicted = N * C (BiAM's `topk` would raise).

    Args:
      scores: [N, C] scores, higher = more confident.
      targets: [N, C] 0/1 ground truth.
      k: how many classes each image predicts, a positive integer.
      mask: optional [N, C] bool; False makes the entry a non-positive (it can still be predicted).

    Returns:
      {"P_at{k}", "R_at{k}", "F1_at{k}"} as plain Python floats in percent. P is NaN when N = 0;
      R and F1 are NaN when there is no positive at all.
    """
    scores, targets, mask = _validate(scores, targets, mask)
    predicted = _topk_mask(scores, k)
    positive = targets & mask
    tp = float((predicted & positive).sum())
    n_pred = float(predicted.sum())
    n_pos = float(positive.sum())
    precision = tp / n_pred if n_pred > 0 else float("nan")
    recall = tp / n_pos if n_pos > 0 else float("nan")
    values = (precision, recall, _f1(precision, recall))
    names = (f"P_at{k}", f"R_at{k}", f"F1_at{k}")
    return {name: float(100.0 * v) for name, v in zip(names, values, strict=True)}


def _check_ks(ks: Any) -> tuple[int, ...]:
    ks = tuple(ks)
    for k in ks:
        _check_k(k)
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a value; got {ks}")
    return ks


def zero_shot_metric_names(ks: Any = ZERO_SHOT_KS) -> list[str]:
    """The keys of `zero_shot_metrics(..., ks=ks)`, in order.

    `["mAP", "P_at3", "R_at3", "F1_at3", "P_at5", "R_at5", "F1_at5"]` for the default ks.
    """
    names = ["mAP"]
    for k in _check_ks(ks):
        names += [f"P_at{k}", f"R_at{k}", f"F1_at{k}"]
    return names


def zero_shot_metrics(
    scores: Any, targets: Any, mask: Any = None, ks: Any = ZERO_SHOT_KS
) -> dict[str, float]:
    """The zero-shot / GZSL table of BiAM, LESA, MKT and SigRL, in percent.

    Keys (`zero_shot_metric_names(ks)`): `mAP` (`zero_shot_map`: non-interpolated, 0 for a class
    without positives, averaged over every class; not the interpolated `mAP` of `compute_all`)
    and, for each k in `ks`, `P_at{k}`, `R_at{k}`, `F1_at{k}` (`overall_prf_at_k`). Call it
    once on the ZSL matrix (unseen classes only) and once on the GZSL matrix (all classes) and
    prefix the keys to tell them apart.

    Args:
      scores: [N, C] scores, higher = more confident.
      targets: [N, C] 0/1 ground truth.
      mask: optional [N, C] bool, True where the label is known.
      ks: the top-k sizes; (3, 5) in the papers.

    Returns:
      A flat dict of plain Python floats, in the order of `zero_shot_metric_names(ks)`.
    """
    ks = _check_ks(ks)
    result = {"mAP": zero_shot_map(scores, targets, mask)}
    for k in ks:
        result.update(overall_prf_at_k(scores, targets, k=k, mask=mask))
    return result

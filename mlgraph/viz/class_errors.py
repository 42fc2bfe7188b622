"""Where a multi-label model goes wrong, from its scores on a split: per-class AP with each
class's positives, the best and worst classes, the label pairs it confuses, and the examples
it gets most wrong. numpy, vectorised over the whole split (a 40,504 x 80 COCO matrix takes
well under a second).

Conventions as `mlgraph.metrics`: `scores` [N, C] probabilities, `labels` [N, C] 0/1, `mask`
[N, C] bool (False: the pair counts nowhere, e.g. VOC's difficult ones); a prediction is
`score >= threshold`, 0.5 as the papers' thresholded metrics (CP, CR, ..., `metrics.
threshold_metrics`). Ties go to the lower sample or class index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mlgraph import metrics

THRESHOLD = 0.5


def _inputs(scores, labels, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 scores, bool labels, bool mask), checked by the metrics' own check."""
    return metrics._validate(scores, labels, mask)


def class_ap(scores, labels, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(AP [C] as fractions, `metrics.average_precision`: NaN for a class without positives;
    positives [C]: each class's kept positive count)."""
    scores, labels, mask = _inputs(scores, labels, mask)
    return metrics.average_precision(scores, labels, mask), (labels & mask).sum(axis=0)


def best_and_worst(ap: np.ndarray, n: int = 5) -> tuple[list[int], list[int]]:
    """(the `n` classes of highest AP, best first; the `n` of lowest AP, worst first), among
    the classes with an AP (positives); ties to the lower class index. With fewer than 2n such
    classes the two lists share some."""
    defined = np.flatnonzero(~np.isnan(ap))
    by_ap = defined[np.argsort(ap[defined], kind="stable")]
    worst = [int(c) for c in by_ap[:n]]
    best_first = defined[np.argsort(-ap[defined], kind="stable")]
    return [int(c) for c in best_first[:n]], worst


def pr_curves(scores, labels, mask, classes: Sequence[int]) -> list[tuple]:
    """`metrics.precision_recall_curve` of `classes` (recall, precision, interpolated
    precision per class), in that order."""
    scores, labels, mask = _inputs(scores, labels, mask)
    cols = list(classes)
    return metrics.precision_recall_curve(scores[:, cols], labels[:, cols], mask[:, cols])


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two classes `a` < `b` predicted together on `count` images where exactly one was true:
    `a_true` of them with `a` true and `b` wrongly added, `b_true` the other way round."""

    a: int
    b: int
    count: int
    a_true: int
    b_true: int


def added_with(scores, labels, mask=None, threshold: float = THRESHOLD) -> np.ndarray:
    """M [C, C] int64: M[a, b] = the images where `a` is a true label and predicted, and `b` is
    predicted but not true (both pairs kept by `mask`); the diagonal is 0."""
    scores, labels, mask = _inputs(scores, labels, mask)
    predicted = (scores >= threshold) & mask
    right = (predicted & labels).astype(np.float64)
    wrong = (predicted & ~labels).astype(np.float64)
    # A count per (a, b) is a sum over images of right[n, a] * wrong[n, b]: one product.
    counts = np.rint(right.T @ wrong).astype(np.int64)
    np.fill_diagonal(counts, 0)  # right & wrong never hold together; kept exact anyway
    return counts


def confused_pairs(
    scores, labels, mask=None, top: int = 10, threshold: float = THRESHOLD
) -> list[Pair]:
    """The label pairs most often confused: predicted together where only one is true.

    For classes a != b and an image n with both pairs kept by `mask`, the pair {a, b} is
    confused on n when both are predicted (score >= `threshold`) and exactly one of them is a
    true label of n. Its count is M[a, b] + M[b, a] with M = `added_with`. Returns the `top`
    pairs of highest count (a count of 0 is no confusion and never listed), ties to the lower
    (a, b).
    """
    m = added_with(scores, labels, mask, threshold)
    total = np.triu(m + m.T, k=1)
    a, b = np.nonzero(total)
    counts = total[a, b]
    # Descending count; np.nonzero lists (a, b) in ascending order, which a stable sort keeps.
    order = np.argsort(-counts, kind="stable")[:top]
    return [
        Pair(int(a[i]), int(b[i]), int(counts[i]), int(m[a[i], b[i]]), int(m[b[i], a[i]]))
        for i in order
    ]


@dataclasses.dataclass(frozen=True)
class Mistakes:
    """One class's worst examples: `false_positives` (images without the class scored
    >= threshold, highest score first) and `false_negatives` (images with it scored below,
    lowest first), as row indices of the split, with their `fp_scores` / `fn_scores`."""

    cls: int
    false_positives: np.ndarray
    fp_scores: np.ndarray
    false_negatives: np.ndarray
    fn_scores: np.ndarray


def worst_examples(
    scores, labels, mask, classes: Sequence[int], k: int = 4, threshold: float = THRESHOLD
) -> list[Mistakes]:
    """For each of `classes`, the `k` highest-scored false positives and the `k`
    lowest-scored false negatives (pairs kept by `mask` only; ties to the lower row)."""
    scores, labels, mask = _inputs(scores, labels, mask)
    out = []
    for c in classes:
        s, y, keep = scores[:, c], labels[:, c], mask[:, c]
        fp = np.flatnonzero(keep & ~y & (s >= threshold))
        fp = fp[np.argsort(-s[fp], kind="stable")[:k]]
        fn = np.flatnonzero(keep & y & (s < threshold))
        fn = fn[np.argsort(s[fn], kind="stable")[:k]]
        out.append(Mistakes(int(c), fp, s[fp], fn, s[fn]))
    return out

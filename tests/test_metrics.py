"""Tests for mlgraph.metrics: hand-computed cases, scikit-learn and loop references."""

import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlgraph import metrics

EPS = np.finfo(np.float64).eps


def _column(targets_in_rank_order):
    """[N, 1] scores/targets whose descending-score ranking gives the listed targets."""
    t = np.asarray(targets_in_rank_order, dtype=np.int64)[:, None]
    s = np.linspace(0.9, 0.1, len(t))[:, None]
    return s, t


def _ap_mean_max_precision(scores, targets, mask):
    """Reference AP: mean over positives of the max precision at or beyond their rank."""
    out = []
    for c in range(scores.shape[1]):
        keep = mask[:, c]
        s, t = scores[keep, c], targets[keep, c]
        t = t[np.argsort(-s, kind="stable")]
        if t.sum() == 0:
            out.append(np.nan)
            continue
        precision = [t[: r + 1].sum() / (r + 1) for r in range(len(t))]
        per_positive = [max(precision[r:]) for r in range(len(t)) if t[r] == 1]
        out.append(sum(per_positive) / len(per_positive))
    return np.array(out)


def _ap_voc12_sentinels(scores, targets, mask):
    """Reference AP in the VOC-2012 devkit form: sentinels, right envelope, recall steps."""
    out = []
    for c in range(scores.shape[1]):
        keep = mask[:, c]
        s, t = scores[keep, c], targets[keep, c]
        t = t[np.argsort(-s, kind="stable")]
        npos = t.sum()
        if npos == 0:
            out.append(np.nan)
            continue
        tp = np.cumsum(t)
        rec = np.concatenate(([0.0], tp / npos, [1.0]))
        prec = np.concatenate(([0.0], tp / np.arange(1, len(t) + 1), [0.0]))
        for i in range(len(prec) - 2, -1, -1):
            prec[i] = max(prec[i], prec[i + 1])
        ap = 0.0
        for i in range(len(rec) - 1):
            if rec[i + 1] != rec[i]:
                ap += (rec[i + 1] - rec[i]) * prec[i + 1]
        out.append(ap)
    return np.array(out)


def _random_case(seed, n=120, c=6, p_pos=0.3, p_mask=0.15):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, c))  # continuous: ties have probability ~0
    targets = (rng.random((n, c)) < p_pos).astype(np.int64)
    mask = rng.random((n, c)) >= p_mask
    return scores, targets, mask


# ---------------------------------------------------------------- average precision


@pytest.mark.parametrize(
    ("ranked", "expected"),
    [
        # precisions at ranks 1..3: 1, 1/2, 2/3; positives at ranks 1 and 3:
        # envelope 1 and 2/3 -> (1 + 2/3) / 2 = 5/6
        ([1, 0, 1], 5 / 6),
        # precisions 0, 1/2, 2/3; envelope at ranks 2, 3 is max(1/2, 2/3) = 2/3 for both -> 2/3
        ([0, 1, 1], 2 / 3),
        # precisions 0, 0, 1/3, 1/2; envelope 1/2 at both positives -> 1/2
        ([0, 0, 1, 1], 1 / 2),
        # precisions 1, 1/2, 1/3, 1/2, 3/5; envelopes 1, 3/5, 3/5 -> (1 + 6/5) / 3 = 11/15
        ([1, 0, 0, 1, 1], 11 / 15),
        # single positive at rank 4: 1/4
        ([0, 0, 0, 1], 1 / 4),
    ],
)
def test_ap_hand_cases(ranked, expected):
    s, t = _column(ranked)
    np.testing.assert_allclose(metrics.average_precision(s, t), [expected], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "ranked",
    [
        [1, 1, 0, 0, 0],  # perfectly separable: both 1
        [1, 0, 1, 0],  # precision at positives 1, 2/3 is already non-increasing
        [1, 1, 0, 0, 1],  # 1, 1, 3/5
        [1, 0, 1],  # 1, 2/3
    ],
)
def test_ap_equals_sklearn_when_precision_at_positives_is_non_increasing(ranked):
    s, t = _column(ranked)
    ours = metrics.average_precision(s, t)[0]
    assert ours == pytest.approx(average_precision_score(t[:, 0], s[:, 0]), abs=1e-15)


def test_ap_interpolation_exceeds_sklearn_when_precision_rises():
    # [0, 1, 1]: sklearn's step sum (1/2 + 2/3) / 2 = 7/12; the envelope gives 2/3.
    s, t = _column([0, 1, 1])
    assert average_precision_score(t[:, 0], s[:, 0]) == pytest.approx(7 / 12, abs=1e-15)
    assert metrics.average_precision(s, t)[0] == pytest.approx(2 / 3, abs=1e-15)


def test_ap_matches_loop_references_and_bounds_sklearn_on_random_data():
    scores, targets, mask = _random_case(0)
    ours = metrics.average_precision(scores, targets, mask)
    np.testing.assert_allclose(ours, _ap_mean_max_precision(scores, targets, mask), atol=1e-12)
    np.testing.assert_allclose(ours, _ap_voc12_sentinels(scores, targets, mask), atol=1e-12)

    # Without a mask: the envelope AP is never below sklearn's and is above it for noisy data.
    ours = metrics.average_precision(scores, targets)
    full = np.ones_like(mask)
    np.testing.assert_allclose(ours, _ap_voc12_sentinels(scores, targets, full), atol=1e-12)
    sk = np.array([average_precision_score(targets[:, c], scores[:, c]) for c in range(6)])
    assert np.all(ours >= sk - 1e-12)
    assert np.all(ours > sk)


def test_ap_perfect_ranking_is_one_like_sklearn():
    rng = np.random.default_rng(1)
    targets = (rng.random((50, 4)) < 0.4).astype(np.int64)
    targets[0] = 1  # every class has a positive
    scores = targets + 0.5 * rng.random((50, 4))  # every positive outranks every negative
    np.testing.assert_array_equal(metrics.average_precision(scores, targets), np.ones(4))
    assert average_precision_score(targets, scores, average="macro") == 1.0
    assert metrics.mean_average_precision(scores, targets) == 100.0


def test_ap_accepts_bool_targets_and_float32_scores():
    scores, targets, mask = _random_case(2, n=40, c=3)
    expected = metrics.average_precision(scores, targets, mask)
    got = metrics.average_precision(scores.astype(np.float32), targets.astype(bool), mask)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_mask_equals_computing_on_the_kept_subset():
    scores, targets, mask = _random_case(3, n=80, c=5, p_mask=0.3)
    ours = metrics.average_precision(scores, targets, mask)
    for c in range(5):
        keep = mask[:, c]
        subset = metrics.average_precision(scores[keep, c : c + 1], targets[keep, c : c + 1])
        assert ours[c] == pytest.approx(subset[0], abs=1e-15)


def test_mask_hand_case():
    # Ranking [0, 1, 1] has AP 2/3; dropping the top-ranked negative leaves [1, 1] -> AP 1.
    s, t = _column([0, 1, 1])
    mask = np.array([[False], [True], [True]])
    assert metrics.average_precision(s, t, mask)[0] == 1.0
    # Dropping a positive instead leaves [0, 1] -> AP 1/2.
    mask = np.array([[True], [True], [False]])
    assert metrics.average_precision(s, t, mask)[0] == 0.5


def test_class_without_positives_is_nan_and_left_out_of_map():
    s0, t0 = _column([1, 0, 1])  # AP 5/6
    s2, t2 = _column([1, 1, 0])  # AP 1
    scores = np.hstack([s0, s0, s2])
    targets = np.hstack([t0, np.zeros_like(t0), t2])
    ap = metrics.average_precision(scores, targets)
    assert np.isnan(ap[1])
    np.testing.assert_allclose(ap[[0, 2]], [5 / 6, 1.0], atol=1e-15)
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(
        100 * (5 / 6 + 1) / 2, abs=1e-12
    )


def test_class_whose_positives_are_all_masked_is_nan():
    s, t = _column([1, 0, 1])
    mask = (t == 0).astype(bool)
    assert np.isnan(metrics.average_precision(s, t, mask)[0])


def test_map_raises_when_no_class_has_a_positive():
    scores = np.random.default_rng(4).random((5, 3))
    message = (
        "mean_average_precision: no class has a positive target (after masking); mAP is undefined"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        metrics.mean_average_precision(scores, np.zeros((5, 3)))
    targets = np.eye(5, 3)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        metrics.mean_average_precision(scores, targets, targets == 0)


# ---------------------------------------------------------------- threshold / top-k

# Hand case: N = 4 samples, C = 3 classes.
SCORES = np.array(
    [
        [0.9, 0.6, 0.1],
        [0.4, 0.7, 0.2],
        [0.8, 0.3, 0.3],
        [0.2, 0.5, 0.4],  # 0.5 == threshold counts as predicted
    ]
)
TARGETS = np.array(
    [
        [1, 0, 0],
        [1, 1, 0],
        [0, 1, 1],
        [0, 0, 0],
    ]
)


def test_threshold_metrics_hand_case_with_never_predicted_class():
    # Predicted (>= 0.5): class 0 rows {0, 2}, class 1 rows {0, 1, 3}, class 2 none.
    # class 0: gt 2, pd 2, tp 1 | class 1: gt 2, pd 3, tp 1 | class 2: gt 1, pd 0, tp 0.
    # OP = 2/5, OR = 2/5, OF1 = 2/5.
    # CP = mean(1/2, 1/3, eps/eps = 1) = 11/18 (class 2 never predicted -> precision 1).
    # CR = mean(1/2, 1/2, eps/1) = (1 + eps)/3; CF1 = 2 CP CR / (CP + CR) ~= 22/51.
    got = metrics.threshold_metrics(SCORES, TARGETS)
    cr = (1 + EPS) / 3
    cf1 = 2 * (11 / 18) * cr / (11 / 18 + cr)
    expected = {
        "CP": 100 * 11 / 18,
        "CR": 100 * cr,
        "CF1": 100 * cf1,
        "OP": 40.0,
        "OR": 40.0,
        "OF1": 40.0,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-14), key
    assert got["CF1"] == pytest.approx(100 * 22 / 51, rel=1e-12)
    assert all(type(v) is float for v in got.values())


def test_threshold_metrics_custom_threshold():
    # Threshold 0.75: predicted only (0, 0) and (2, 0); class 0: gt 2, pd 2, tp 1.
    # OP = 1/2, OR = 1/5, OF1 = 2 * 0.1 / 0.7 = 2/7.
    # CP = mean(1/2, 1, 1) = 5/6; CR = mean(1/2, eps/2, eps) ~= 1/6.
    got = metrics.threshold_metrics(SCORES, TARGETS, threshold=0.75)
    assert got["OP"] == pytest.approx(50.0, rel=1e-14)
    assert got["OR"] == pytest.approx(20.0, rel=1e-14)
    assert got["OF1"] == pytest.approx(100 * 2 / 7, rel=1e-14)
    assert got["CP"] == pytest.approx(100 * 5 / 6, rel=1e-14)
    assert got["CR"] == pytest.approx(100 / 6, rel=1e-14)


def test_threshold_metrics_mask_hand_case():
    # Masking (2, 0) removes a false positive of class 0: gt 2, pd 1, tp 1.
    # Masking (1, 1) removes a true positive of class 1: gt 1, pd 2, tp 0.
    # Sums: tp 1, pd 3, gt 4 -> OP 1/3, OR 1/4.
    # CP = mean(1, eps/2, 1) = (2 + eps/2)/3; CR = mean(1/2, eps, eps) = (1/2 + 2 eps)/3.
    mask = np.ones(SCORES.shape, dtype=bool)
    mask[2, 0] = mask[1, 1] = False
    got = metrics.threshold_metrics(SCORES, TARGETS, mask=mask)
    assert got["OP"] == pytest.approx(100 / 3, rel=1e-14)
    assert got["OR"] == pytest.approx(25.0, rel=1e-14)
    assert got["OF1"] == pytest.approx(100 * 2 * (1 / 12) / (7 / 12), rel=1e-14)
    assert got["CP"] == pytest.approx(100 * 2 / 3, rel=1e-14)
    assert got["CR"] == pytest.approx(100 / 6, rel=1e-14)


def test_threshold_mask_equals_negative_unpredicted_entries_on_random_data():
    # A masked entry contributes to no count, exactly like a negative scored below threshold.
    scores, targets, mask = _random_case(5)
    got = metrics.threshold_metrics(scores, targets, mask=mask)
    expected = metrics.threshold_metrics(np.where(mask, scores, 0.0), np.where(mask, targets, 0))
    assert got == pytest.approx(expected, rel=1e-14)


def test_undefined_overall_values_are_nan():
    # Nothing predicted: OP is 0/0 (NaN); every class has precision eps/eps = 1 -> CP 100.
    got = metrics.threshold_metrics(np.zeros((3, 2)), np.eye(3, 2))
    assert np.isnan(got["OP"]) and np.isnan(got["OF1"])
    assert got["OR"] == 0.0
    assert got["CP"] == 100.0


def test_f1_is_zero_when_precision_and_recall_are_zero():
    # Every prediction wrong: tp = 0 everywhere while every pd, gt > 0.
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    targets = np.array([[0, 1], [1, 0]])
    # The class values are eps-sized rather than 0 (tp is clamped to eps before dividing).
    got = metrics.threshold_metrics(scores, targets)
    assert got["OP"] == got["OR"] == got["OF1"] == 0.0
    assert got["CP"] == pytest.approx(100 * EPS, rel=1e-12)
    assert got["CR"] == pytest.approx(100 * EPS, rel=1e-12)
    assert got["CF1"] == pytest.approx(100 * EPS, rel=1e-12)


def test_topk_hand_case_and_no_mutation():
    # Top-1 per row keeps (0,0)=0.9, (1,1)=0.7, (2,0)=0.8, (3,1)=0.5; (0,1)=0.6 is zeroed.
    # class 0: gt 2, pd 2, tp 1 | class 1: gt 2, pd 2 (rows 1, 3), tp 1 | class 2: gt 1, pd 0.
    # OP = 2/4, OR = 2/5, OF1 = 0.4/0.9 = 4/9.
    # CP = mean(1/2, 1/2, 1) = 2/3; CR = (1 + eps)/3; CF1 ~= 2 (2/3)(1/3) / 1 = 4/9.
    scores = SCORES.copy()
    scores.flags.writeable = False  # any in-place write would raise
    got = metrics.topk_metrics(scores, TARGETS, k=1)
    np.testing.assert_array_equal(scores, SCORES)
    cr = (1 + EPS) / 3
    expected = {
        "CP_top1": 100 * 2 / 3,
        "CR_top1": 100 * cr,
        "CF1_top1": 100 * 2 * (2 / 3) * cr / (2 / 3 + cr),
        "OP_top1": 50.0,
        "OR_top1": 40.0,
        "OF1_top1": 100 * 4 / 9,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-14), key


def test_topk_scores_zeroes_outside_top_k_and_breaks_ties_by_class_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.6, 0.6, 0.6, 0.2]], dtype=np.float32)
    before = scores.copy()
    np.testing.assert_array_equal(
        metrics.topk_scores(scores, k=2),
        np.array([[0.0, 0.9, 0.0, 0.7], [0.6, 0.6, 0.0, 0.0]], dtype=np.float32),
    )
    np.testing.assert_array_equal(scores, before)
    np.testing.assert_array_equal(metrics.topk_scores(scores, k=10), scores)


def test_top3_on_wider_case_with_mask_taking_a_slot():
    # C = 4. Row 0: top-3 are classes 0, 1, 2 (0.95, 0.9, 0.8); class 3 (0.7) is zeroed even
    # though it is a positive. Row 1: classes 1, 2, 3 kept; class 0 (0.1) zeroed.
    # The mask drops (0, 0) after the top-3 choice, so row 0 cannot promote class 3.
    scores = np.array([[0.95, 0.9, 0.8, 0.7], [0.1, 0.6, 0.55, 0.52]])
    targets = np.array([[1, 1, 0, 1], [0, 1, 0, 1]])
    mask = np.ones((2, 4), dtype=bool)
    mask[0, 0] = False
    got = metrics.topk_metrics(scores, targets, k=3, mask=mask)
    # Kept predictions: (0,1), (0,2), (1,1), (1,2), (1,3); positives: (0,1), (0,3), (1,1), (1,3).
    # tp 3, pd 5, gt 4 -> OP 3/5, OR 3/4.
    # per class: c0 gt0 pd0 tp0 | c1 gt2 pd2 tp2 | c2 gt0 pd2 tp0 | c3 gt2 pd1 tp1.
    # CP = mean(1, 1, eps/2, 1) = (3 + eps/2)/4; CR = mean(1, 1, 1, 1/2) = 7/8.
    assert got["OP_top3"] == pytest.approx(60.0, rel=1e-14)
    assert got["OR_top3"] == pytest.approx(75.0, rel=1e-14)
    assert got["CP_top3"] == pytest.approx(75.0, rel=1e-14)
    assert got["CR_top3"] == pytest.approx(87.5, rel=1e-14)


def test_compute_all_keys_and_consistency():
    scores, targets, mask = _random_case(6, n=60, c=5)
    got = metrics.compute_all(scores, targets, mask=mask)
    six = ["CP", "CR", "CF1", "OP", "OR", "OF1"]
    keys = ["mAP", "mAP_noninterp", "spml_mAP"]
    assert list(got) == [*keys, *six, *(f"{k}_top3" for k in six)]
    assert metrics.metric_names() == list(got)
    assert got["spml_mAP"] == metrics.spml_map(scores, targets, mask)
    assert all(type(v) is float for v in got.values())
    ap = _ap_mean_max_precision(scores, targets, mask)
    assert got["mAP"] == pytest.approx(100 * np.nanmean(ap), rel=1e-12)
    assert {k: got[k] for k in six} == metrics.threshold_metrics(scores, targets, mask=mask)
    assert list(metrics.compute_all(scores, targets, topk=None)) == [*keys, *six]
    assert "OF1_top2" in metrics.compute_all(scores, targets, topk=2)


# ---------------------------------------------------------------- validation


def test_validation_errors():
    s = np.zeros((4, 3))
    with pytest.raises(ValueError, match=re.escape("scores must be 2-D [N, C]; got shape (4,)")):
        metrics.average_precision(np.zeros(4), np.zeros(4))
    with pytest.raises(
        ValueError, match=re.escape("targets shape (4, 2) does not match scores shape (4, 3)")
    ):
        metrics.threshold_metrics(s, np.zeros((4, 2)))
    with pytest.raises(
        ValueError, match=re.escape("mask shape (3, 3) does not match scores shape (4, 3)")
    ):
        metrics.average_precision(s, np.zeros((4, 3)), np.ones((3, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"mask must be a boolean array .* got dtype int64"):
        metrics.compute_all(s, np.eye(4, 3), mask=np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"targets must contain only 0 and 1; found -1"):
        metrics.average_precision(s, -np.ones((4, 3)))
    with pytest.raises(ValueError, match="scores contain NaN"):
        metrics.average_precision(np.full((4, 3), np.nan), np.eye(4, 3))
    with pytest.raises(ValueError, match="at least one class column"):
        metrics.average_precision(np.zeros((4, 0)), np.zeros((4, 0)))
    with pytest.raises(ValueError, match=re.escape("k must be a positive integer; got 0")):
        metrics.topk_metrics(s, np.eye(4, 3), k=0)
    with pytest.raises(ValueError, match="threshold must be finite"):
        metrics.threshold_metrics(s, np.eye(4, 3), threshold=float("nan"))


def _mlgcn_average_precision(output: np.ndarray, target: np.ndarray) -> float:
    """ML-GCN's `AveragePrecisionMeter.average_precision` (util.py), for one class."""
    indices = np.argsort(-output, kind="stable")
    total_count = np.cumsum(np.ones(len(output)))
    target_ = target[indices]
    ind = target_ == 1
    pos_count = np.cumsum(ind).astype(np.float64)
    total = pos_count[-1]
    pos_count[np.logical_not(ind)] = 0
    return float(np.sum(pos_count / total_count) / (total + 1e-8))


def test_non_interpolated_ap_is_mlgcn_and_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(11)
    scores = rng.random((80, 6))  # continuous: no ties, where all three definitions agree
    targets = (rng.random((80, 6)) < 0.3).astype(np.int64)
    got = metrics.average_precision(scores, targets, interpolated=False)
    for c in range(6):
        assert got[c] == pytest.approx(
            _mlgcn_average_precision(scores[:, c], targets[:, c]), rel=1e-7
        )
        assert got[c] == pytest.approx(
            average_precision_score(targets[:, c], scores[:, c]), rel=1e-12
        )
    interp = metrics.average_precision(scores, targets)
    assert np.all(interp >= got) and np.any(interp > got)
    # Hand case: positives at ranks 1 and 3 of 4 -> (1/1 + 2/3) / 2; the envelope keeps 1, 2/3.
    s = np.array([[0.9], [0.8], [0.7], [0.1]])
    t = np.array([[1], [0], [1], [0]])
    assert metrics.average_precision(s, t, interpolated=False)[0] == pytest.approx(5 / 6)
    got_all = metrics.compute_all(scores, targets)
    assert got_all["mAP_noninterp"] == pytest.approx(100 * got.mean(), rel=1e-12)


# ---------------------------------------------------------------- zero-shot table (BiAM)

# AP hand case: N = 5 samples, C = 4 classes.
ZS_SCORES = np.array(
    [
        [0.9, 0.9, 0.1, 0.9],
        [0.8, 0.8, 0.9, 0.8],
        [0.7, 0.7, 0.8, 0.7],
        [0.6, 0.6, 0.3, 0.6],
        [0.5, 0.5, 0.2, 0.5],
    ]
)
ZS_TARGETS = np.array(
    [
        [1, 0, 1, 0],
        [0, 0, 0, 1],
        [1, 0, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
)
ZS_MASK = np.ones(ZS_SCORES.shape, dtype=bool)
ZS_MASK[1, 2] = False  # class 2: drops its top-ranked negative (0.9)
ZS_MASK[1, 3] = False  # class 3: drops its only positive


def test_zero_shot_map_hand_case_counts_classes_without_positives_as_zero():
    # class 0: ranking [+, -, +, -, -]: precision 1 and 2/3 at the positives -> 5/6.
    # class 1: no positive -> 0, still averaged.
    # class 2: kept ranking by score 0.8(+), 0.3(-), 0.2(-), 0.1(+) -> (1 + 2/4) / 2 = 3/4
    #   (unmasked it would be 0.9(-), 0.8(+), ..., 0.1(+) -> (1/2 + 2/5) / 2 = 0.45).
    # class 3: its only positive is masked -> no positive -> 0, still averaged.
    # mAP = 100 (5/6 + 0 + 3/4 + 0) / 4 = 100 * 19/48.
    got = metrics.zero_shot_map(ZS_SCORES, ZS_TARGETS, ZS_MASK)
    assert got == pytest.approx(100 * 19 / 48, rel=1e-14)
    assert type(got) is float
    unmasked = metrics.zero_shot_map(ZS_SCORES, ZS_TARGETS)
    # class 3 unmasked: positive at rank 2 -> 1/2.
    assert unmasked == pytest.approx(100 * (5 / 6 + 0 + 0.45 + 0.5) / 4, rel=1e-14)
    # The same per-class values as the non-interpolated AP, with NaN read as 0.
    ap = metrics.average_precision(ZS_SCORES, ZS_TARGETS, ZS_MASK, interpolated=False)
    np.testing.assert_allclose(ap, [5 / 6, np.nan, 3 / 4, np.nan], rtol=1e-14)
    # mean_average_precision instead leaves the empty classes out: (5/6 + 3/4) / 2.
    assert metrics.mean_average_precision(
        ZS_SCORES, ZS_TARGETS, ZS_MASK, interpolated=False
    ) == pytest.approx(100 * 19 / 24, rel=1e-14)


def test_zero_shot_map_ranks_ties_in_sample_order_without_grouping():
    # Two tied scores: [-, +] in sample order -> the positive is at rank 2 -> AP 1/2;
    # [+, -] -> rank 1 -> AP 1 (scikit-learn / spml_map group the tie: 1/2 for both).
    scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    targets = np.array([[0, 1], [1, 0]])
    assert metrics.zero_shot_map(scores, targets) == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert metrics.spml_map(scores, targets) == pytest.approx(50.0)


# F1@K hand case: N = 4 images, C = 4 classes.
F1_SCORES = np.array(
    [
        [0.9, 0.8, 0.1, 0.2],
        [0.3, 0.6, 0.7, 0.1],  # an image without positives
        [0.5, 0.5, 0.5, 0.9],  # a three-way tie below the top score
        [0.4, 0.9, 0.8, 0.3],
    ]
)
F1_TARGETS = np.array(
    [
        [1, 0, 0, 1],
        [0, 0, 0, 0],
        [0, 1, 0, 1],
        [0, 1, 1, 0],
    ]
)
F1_MASK = np.ones(F1_SCORES.shape, dtype=bool)
F1_MASK[3, 2] = False  # a masked positive: predicted at K >= 2 but never a hit nor counted in R


@pytest.mark.parametrize(
    ("k", "tp", "n_pred"),
    [
        # K=1: predicted (0,0)+ (1,2)- (2,3)+ (3,1)+ -> TP 3 of 4.
        (1, 3, 4),
        # K=2: row 0 {0, 1}: 1 hit; row 1 {2, 1}: 0 hits but 2 predictions;
        # row 2 {3, 0} (the tie 0.5 goes to the lowest class, 0): 1 hit;
        # row 3 {1, 2}: (3,1) hits, (3,2) is masked -> 1 hit. TP 3 of 8.
        (2, 3, 8),
        # K=3 >= every image's number of positives: every kept positive is found.
        # row 0 {0, 1, 3}: 2; row 1: 0; row 2 {3, 0, 1}: 2; row 3 {1, 2, 0}: 1. TP 5 of 12.
        (3, 5, 12),
        # K=5 > C=4: every class predicted, N * C = 16 predictions, TP = all 5 positives.
        (5, 5, 16),
    ],
)
def test_overall_prf_at_k_hand_case(k, tp, n_pred):
    # Positives counted for R: row 0: 2, row 1: 0, row 2: 2, row 3: 1 (one masked) -> 5.
    got = metrics.overall_prf_at_k(F1_SCORES, F1_TARGETS, k=k, mask=F1_MASK)
    p, r = tp / n_pred, tp / 5
    assert list(got) == [f"P_at{k}", f"R_at{k}", f"F1_at{k}"]
    assert got[f"P_at{k}"] == pytest.approx(100 * p, rel=1e-14)
    assert got[f"R_at{k}"] == pytest.approx(100 * r, rel=1e-14)
    assert got[f"F1_at{k}"] == pytest.approx(100 * 2 * p * r / (p + r), rel=1e-14)
    assert all(type(v) is float for v in got.values())


def test_overall_prf_at_k_hand_values():
    # The parametrized case spelled out: K=2 gives P 3/8, R 3/5, F1 2(9/40)/(39/40) = 6/13;
    # K=3 gives P 5/12, R 1, F1 10/17.
    got = metrics.overall_prf_at_k(F1_SCORES, F1_TARGETS, k=2, mask=F1_MASK)
    assert got == pytest.approx({"P_at2": 37.5, "R_at2": 60.0, "F1_at2": 100 * 6 / 13})
    got = metrics.overall_prf_at_k(F1_SCORES, F1_TARGETS, k=3, mask=F1_MASK)
    assert got == pytest.approx({"P_at3": 100 * 5 / 12, "R_at3": 100.0, "F1_at3": 100 * 10 / 17})
    # Unmasked, (3,2) is a hit at K=2: TP 4 of 8, positives 6 -> P 1/2, R 2/3.
    got = metrics.overall_prf_at_k(F1_SCORES, F1_TARGETS, k=2)
    assert got["P_at2"] == pytest.approx(50.0) and got["R_at2"] == pytest.approx(200 / 3)
    # Dropping the image without positives (row 1) shrinks P's denominator: TP 3 of 6.
    keep = [0, 2, 3]
    got = metrics.overall_prf_at_k(F1_SCORES[keep], F1_TARGETS[keep], k=2, mask=F1_MASK[keep])
    assert got["P_at2"] == pytest.approx(50.0) and got["R_at2"] == pytest.approx(60.0)


def test_overall_prf_at_k_degenerate_cases_and_no_mutation():
    # Every prediction wrong: P = R = 0 -> F1 0 (BiAM: 0/0 = NaN).
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    scores.flags.writeable = False  # an in-place write (BiAM's fill_) would raise
    got = metrics.overall_prf_at_k(scores, np.array([[0, 1], [1, 0]]), k=1)
    assert got == {"P_at1": 0.0, "R_at1": 0.0, "F1_at1": 0.0}
    # No positive at all: P 0, R and F1 undefined.
    got = metrics.overall_prf_at_k(scores, np.zeros((2, 2)), k=1)
    assert got["P_at1"] == 0.0 and np.isnan(got["R_at1"]) and np.isnan(got["F1_at1"])
    with pytest.raises(ValueError, match=re.escape("k must be a positive integer; got 0")):
        metrics.overall_prf_at_k(scores, np.eye(2), k=0)


def test_zero_shot_metrics_keys_and_consistency():
    got = metrics.zero_shot_metrics(F1_SCORES, F1_TARGETS, F1_MASK)
    names = ["mAP", "P_at3", "R_at3", "F1_at3", "P_at5", "R_at5", "F1_at5"]
    assert list(got) == names == metrics.zero_shot_metric_names()
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names)
    assert got["mAP"] == metrics.zero_shot_map(F1_SCORES, F1_TARGETS, F1_MASK)
    for k in (3, 5):
        part = metrics.overall_prf_at_k(F1_SCORES, F1_TARGETS, k=k, mask=F1_MASK)
        assert {n: got[n] for n in part} == part
    got = metrics.zero_shot_metrics(F1_SCORES, F1_TARGETS, ks=(1,))
    assert list(got) == ["mAP", "P_at1", "R_at1", "F1_at1"] == metrics.zero_shot_metric_names((1,))
    with pytest.raises(ValueError, match=re.escape("ks must not repeat a value; got (3, 3)")):
        metrics.zero_shot_metric_names((3, 3))
    with pytest.raises(ValueError, match=re.escape("k must be a positive integer; got 0")):
        metrics.zero_shot_metrics(F1_SCORES, F1_TARGETS, ks=(3, 0))


def _biam_compute_ap(predictions, labels, stable=None):
    """BiAM `util_nus.py` `compute_AP`, transcribed; `.cuda()` dropped, `stable` forwarded."""
    import torch

    sort_kwargs = {} if stable is None else {"stable": stable}
    num_class = predictions.size(1)
    ap = torch.zeros(num_class)
    for idx_cls in range(num_class):
        prediction = predictions[:, idx_cls]
        label = labels[:, idx_cls]
        mask = label.abs() == 1
        if (label > 0).sum() == 0:
            continue
        binary_label = torch.clamp(label[mask], min=0, max=1)
        sorted_pred, sort_idx = prediction[mask].sort(descending=True, **sort_kwargs)
        sorted_label = binary_label[sort_idx]
        tmp = (sorted_label == 1).float()
        tp = tmp.cumsum(0)
        fp = (sorted_label != 1).float().cumsum(0)
        num_pos = binary_label.sum()
        prec = tp / (tp + fp)
        ap_cls = (tmp * prec).sum() / num_pos
        ap[idx_cls].copy_(ap_cls)
    return ap


def _biam_compute_f1_overall(predictions, labels, k_val):
    """BiAM `util_nus.py` `compute_F1(mode_F1='overall')`, transcribed; `.cuda()` dropped."""
    import torch

    idx = predictions.topk(dim=1, k=k_val)[1]
    predictions.fill_(0)
    predictions.scatter_(dim=1, index=idx, src=torch.ones(predictions.size(0), k_val))
    mask = predictions == 1
    TP = (labels[mask] == 1).sum().float()
    tpfp = mask.sum().float()
    tpfn = (labels == 1).sum().float()
    p = TP / tpfp
    r = TP / tpfn
    f1 = 2 * p * r / (p + r)
    return f1, p, r


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_metrics_equal_biam_transcription_with_ties_and_zeros(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    n, c = 300, 12
    scores = (rng.integers(0, 5, (n, c)) / 4).astype(np.float32)  # {0, .25, ..., 1}: many ties
    targets = (rng.random((n, c)) < 0.15).astype(np.int64)
    targets[:, [0, 5]] = 0  # classes without positives
    mask = rng.random((n, c)) >= 0.2
    mask[targets[:, 7] == 1, 7] = False  # a class whose positives are all unknown
    labels = torch.from_numpy(np.where(mask, 2 * targets - 1, 0))  # BiAM's +1 / -1 / 0 labels

    # BiAM's unstable sorts leave the order of tied scores unspecified. Breaking every tie
    # towards the lower index with a jitter far below the 0.25 score spacing makes them
    # deterministic, and gives mlgraph's tie rule: mlgraph on the tied scores must match BiAM
    # on the jittered ones.
    by_row = scores - 1e-4 * np.arange(n, dtype=np.float32)[:, None]  # ties within a class
    by_col = scores - 1e-3 * np.arange(c, dtype=np.float32)[None, :]  # ties within an image

    ap = _biam_compute_ap(torch.from_numpy(by_row), labels).numpy()
    ours = metrics.average_precision(scores, targets, mask, interpolated=False)
    assert np.all(ap[[0, 5, 7]] == 0) and np.all(np.isnan(ours[[0, 5, 7]]))
    np.testing.assert_allclose(np.nan_to_num(ours, nan=0.0), ap, rtol=1e-6, atol=0)
    # BiAM's sort made stable gives the same on the tied scores themselves.
    stable = _biam_compute_ap(torch.from_numpy(scores), labels, stable=True).numpy()
    np.testing.assert_allclose(stable, ap, rtol=1e-6, atol=0)

    got = metrics.zero_shot_metrics(scores, targets, mask)
    assert got["mAP"] == pytest.approx(100 * float(ap.mean()), rel=1e-6)
    for k in (3, 5):
        f1, p, r = _biam_compute_f1_overall(torch.from_numpy(by_col.copy()), labels, k)
        assert got[f"P_at{k}"] == pytest.approx(100 * p.item(), rel=1e-6)
        assert got[f"R_at{k}"] == pytest.approx(100 * r.item(), rel=1e-6)
        assert got[f"F1_at{k}"] == pytest.approx(100 * f1.item(), rel=1e-6)

"""mlgraph.viz report: the numbers behind each figure on made inputs (curves of a resumed log,
per-class AP and precision-recall points, confused pairs, worst examples, wall time and
images/s), and the report of a short demo run, with the one-line messages of a workdir it can
draw only in part (no evaluation, an unreadable checkpoint) or not at all.

`demo_report` (one 4-step baseline_demo run on the tiny set, evaluated at its end, and its
report) is shared with tests/test_viz_report_browser.py, computed once per session."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import RecordWriter
from tensorboardX.summary import scalar
from train_helpers import tiny_config

from mlgraph import metrics, train
from mlgraph.errors import WorkdirError
from mlgraph.viz import __main__ as viz_cli
from mlgraph.viz import class_errors, run_log

# ---------------------------------------------------------------------------------------------
# The demo run and its report, once per session
# ---------------------------------------------------------------------------------------------


@functools.cache
def _demo_report(data_dir: str) -> tuple[pathlib.Path, str, str]:
    """(workdir, stdout, stderr) of `python -m mlgraph.viz report` on a 4-step baseline_demo
    run (tiny CNN, the tiny COCO-layout set) with one evaluation, at step 4."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="mlgraph-viz-report-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    config = tiny_config(pathlib.Path(data_dir), total_steps=4)
    config.eval_every_steps = 4
    train.run(config, root / "w")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = viz_cli.main(["report", "--workdir", str(root / "w")])
    assert status == 0, err.getvalue()
    return root / "w", out.getvalue(), err.getvalue()


@pytest.fixture
def demo_report(tiny_coco_dir):
    """`_demo_report` of the session's tiny data set."""
    return _demo_report(str(tiny_coco_dir))


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------
def write_log(path: pathlib.Path, records: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_curves_equal_the_log_and_a_resumed_runs_repeated_steps_are_drawn_once(tmp_path):
    records = [
        {"step": 1, "train/loss": 0.9, "train/lr": 1e-3},
        {"step": 2, "train/loss": 0.8, "train/lr": 2e-3},
        {"step": 2, "eval/mAP": 10.0, "eval/ema_mAP": 11.0, "eval/spml_mAP": 9.0},
        {"step": 3, "train/loss": 0.7, "train/lr": 3e-3},  # killed after this line...
        # ... resumed from the step-2 checkpoint: steps 3 and 4 logged (again)
        {"step": 3, "train/loss": 0.75, "train/lr": 3e-3},
        {"step": 4, "train/loss": 0.6, "train/lr": 4e-3},
        {"step": 4, "eval/mAP": 20.0, "eval/ema_mAP": 21.5, "eval/spml_mAP": 19.0},
    ]
    write_log(tmp_path / "metrics.jsonl", records, torn='{"step": 5, "train/lo')
    found = run_log.curves(run_log.read_records(tmp_path))
    assert list(found) == [
        "train/loss", "train/lr", "eval/mAP", "eval/ema_mAP", "eval/spml_mAP",
    ]  # fmt: skip
    expected = {
        "train/loss": ([1, 2, 3, 4], [0.9, 0.8, 0.75, 0.6]),
        "train/lr": ([1, 2, 3, 4], [1e-3, 2e-3, 3e-3, 4e-3]),
        "eval/mAP": ([2, 4], [10.0, 20.0]),
        "eval/ema_mAP": ([2, 4], [11.0, 21.5]),
        "eval/spml_mAP": ([2, 4], [9.0, 19.0]),
    }
    for name, (steps, values) in expected.items():
        assert found[name].steps.tolist() == steps, name
        assert found[name].values.tolist() == values, name
    panels = {title: [c.name for c in curves] for title, _, curves in run_log.panels(found)}
    assert panels == {
        "training loss": ["train/loss"],
        "learning rate": ["train/lr"],
        "evaluation mAP": ["eval/mAP", "eval/ema_mAP"],
        "other mAPs": ["eval/spml_mAP"],
    }
    assert run_log.best_evaluation(found, "eval/ema_mAP") == (4, 21.5)
    assert run_log.best_evaluation(found, "val/ema_mAP") is None
    # Counts a method logs (SigRL's kept images) get their own axis; a part of the loss, and a
    # count that stayed 0, stay with the loss.
    parts = {"train/kept_images": [30.0, 31.0], "train/rank": [0.5, 0.25], "train/skips": [0, 0]}
    write_log(
        tmp_path / "metrics.jsonl",
        [
            {"step": s, "train/loss": 1.0 / s} | {k: v[s - 1] for k, v in parts.items()}
            for s in (1, 2)
        ],
    )
    found = run_log.curves(run_log.read_records(tmp_path))
    panels = {title: [c.name for c in curves] for title, _, curves in run_log.panels(found)}
    assert panels == {
        "training loss": ["train/loss", "train/rank", "train/skips"],
        "training counts": ["train/kept_images"],
    }


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"step": 1, "x": 1}\n\nnot json\n{"step": 2}\n', "line 3 is not JSON (Expecting value: "
         "line 1 column 1 (char 0))"),
        ('{"step": 1, "x": 1}\n{"x": 2}\n', "record 2 has no integer 'step'"),
    ],
)  # fmt: skip
def test_a_bad_log_line_is_one_line(tmp_path, text, problem):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(WorkdirError) as e:
        run_log.read_records(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}/metrics.jsonl: {problem}; expected one JSON object a line, "
        '{"step": N, "name": value, ...}'
    )


def test_downsample_keeps_the_ends_and_every_buckets_extremes():
    steps = np.arange(1, 100_001)
    values = np.sin(steps / 500.0)
    values[12_345] = 7.0  # a spike
    values[54_321] = -7.0
    values[777] = np.nan  # a NaN never stands for an extreme
    keep = run_log.downsample(steps, values, max_points=2000)
    assert len(keep) <= 2002 and np.all(np.diff(keep) > 0)
    assert keep[0] == 0 and keep[-1] == len(steps) - 1
    assert {12_345, 54_321} <= set(keep.tolist()) and 777 not in keep
    width = -(-len(steps) // 1000)
    for b in (0, 17, 999):  # the lowest and highest value of a few buckets are kept
        part = values[b * width : (b + 1) * width]
        assert b * width + int(np.nanargmin(part)) in keep
        assert b * width + int(np.nanargmax(part)) in keep
    np.testing.assert_array_equal(run_log.downsample(steps[:50], values[:50]), np.arange(50))


def write_events(path: pathlib.Path, events: list[tuple[int, float, list[str]]]) -> None:
    """An event file as mlgraph.metric_writer writes one: (step, wall time, scalar names)."""
    writer = RecordWriter(str(path))
    for step, t, names in events:
        if names:
            event = Event(step=step, wall_time=t, summary=scalar(names[0], 1.0))
            for name in names[1:]:
                event.summary.value.extend(scalar(name, 1.0).value)
        else:
            event = Event(step=step, wall_time=t, file_version="brain.Event:2")
        writer.write(event.SerializeToString())
    writer.flush()
    writer.close()


def test_wall_time_and_images_per_second_from_the_tensorboard_events(tmp_path):
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    # First session: start at t=100, steps 1..10 logged at t=110..128, an evaluation at 130.
    first = [(0, 100.0, [])] + [
        (s, 108.0 + 2 * s, ["train/loss", "train/lr"]) for s in range(1, 11)
    ]
    first += [(10, 130.0, ["eval/mAP"])]
    # Resumed at step 10, a day later: TensorBoard's purge markers (no time), steps 11..20.
    second = [(0, 90_000.0, []), (11, 0.0, [])]
    second += [(s, 90_000.0 + (s - 10), ["train/loss"]) for s in range(11, 21)]
    write_events(folder / "events.out.tfevents.1.host", first)
    write_events(folder / "events.out.tfevents.2.host", second)
    with open(folder / "events.out.tfevents.2.host", "ab") as f:
        f.write(b"\x40\x00\x00")  # a record cut short by a kill
    sessions = run_log.read_sessions(tmp_path)
    assert sessions == [
        run_log.Session(100.0, 130.0, (1, 110.0), (10, 128.0)),
        run_log.Session(90_000.0, 90_010.0, (11, 90_001.0), (20, 90_010.0)),
    ]
    assert run_log.wall_time(sessions) == 30.0 + 10.0
    # (9 + 9 steps) x 16 images over (18 + 9) seconds
    assert run_log.train_images_per_s(sessions, 16) == pytest.approx(18 * 16 / 27, rel=1e-12)
    assert run_log.read_sessions(tmp_path / "none") == []


# ---------------------------------------------------------------------------------------------
# The evaluation's numbers
# ---------------------------------------------------------------------------------------------
def made_split(seed: int = 0, n: int = 300, c: int = 7):
    """Scores with ties, labels with a class never positive, and a mask with holes."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < 0.3).astype(np.float32)
    labels[:, 6] = 0  # no positives: no AP
    scores = np.round(np.clip(labels * 0.3 + rng.random((n, c)) * 0.7, 0, 1), 2)  # ties
    mask = rng.random((n, c)) > 0.1
    return scores, labels, mask


def test_per_class_ap_and_pr_points_are_the_metrics_own():
    scores, labels, mask = made_split()
    ap, positives = class_errors.class_ap(scores, labels, mask)
    np.testing.assert_array_equal(ap, metrics.average_precision(scores, labels, mask))
    assert positives.tolist() == ((labels > 0.5) & mask).sum(axis=0).tolist()
    assert np.isnan(ap[6]) and positives[6] == 0
    assert 100 * np.nanmean(ap) == pytest.approx(
        metrics.mean_average_precision(scores, labels, mask), abs=1e-12
    )
    best, worst = class_errors.best_and_worst(ap, 3)
    defined = [c for c in range(7) if not np.isnan(ap[c])]
    assert best == sorted(defined, key=lambda c: -ap[c])[:3]
    assert worst == sorted(defined, key=lambda c: ap[c])[:3]
    own = metrics.precision_recall_curve(scores, labels, mask)
    picked = best + worst
    for c, got in zip(picked, class_errors.pr_curves(scores, labels, mask, picked), strict=True):
        for a, b in zip(got, own[c], strict=True):
            np.testing.assert_array_equal(a, b)
        recall, precision, envelope = got
        # The AP integrates this curve: the interpolated precision where recall grows.
        grows = np.diff(np.concatenate([[0.0], recall])) > 0
        assert envelope[grows].mean() == pytest.approx(ap[c], abs=1e-12)
        assert len(recall) == mask[:, c].sum()


def test_precision_recall_curve_by_hand():
    # One class ranked 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.6 (masked pos), 0.5 (neg).
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    labels = np.array([[1], [0], [1], [1], [0]])
    mask = np.array([[True], [True], [True], [False], [True]])
    ((recall, precision, envelope),) = metrics.precision_recall_curve(scores, labels, mask)
    assert recall.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert precision.tolist() == [1.0, 0.5, 2 / 3, 0.5]
    assert envelope.tolist() == [1.0, 2 / 3, 2 / 3, 0.5]
    assert metrics.average_precision(scores, labels, mask)[0] == (1.0 + 2 / 3) / 2


def test_confused_pairs_on_a_made_matrix():
    # Classes 0 cat, 1 dog, 2 car, 3 bus. Predicted = score >= 0.5.
    scores = np.array(
        [
            [0.9, 0.8, 0.1, 0.1],  # cat true; dog added        -> {cat, dog}: cat true
            [0.9, 0.7, 0.1, 0.1],  # cat true; dog added        -> {cat, dog}: cat true
            [0.6, 0.9, 0.1, 0.1],  # dog true; cat added        -> {cat, dog}: dog true
            [0.1, 0.1, 0.9, 0.5],  # car true; bus added (0.5 counts as predicted)
            [0.1, 0.1, 0.8, 0.9],  # car and bus both true: no confusion
            [0.8, 0.1, 0.9, 0.1],  # car true; cat added, but (n, cat) is masked
            [0.9, 0.1, 0.1, 0.9],  # neither true: both added, no pair with one true
        ]
    )
    labels = np.array(
        [
            [1, 0, 0, 0],
            [1, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 1, 1],
            [0, 0, 1, 0],
            [0, 0, 0, 0],
        ]
    )
    mask = np.ones(labels.shape, bool)
    mask[5, 0] = False
    added = class_errors.added_with(scores, labels, mask)
    expected = np.zeros((4, 4), int)
    expected[0, 1] = 2  # cat true, dog added
    expected[1, 0] = 1
    expected[2, 3] = 1
    np.testing.assert_array_equal(added, expected)
    assert class_errors.confused_pairs(scores, labels, mask) == [
        class_errors.Pair(0, 1, 3, 2, 1),
        class_errors.Pair(2, 3, 1, 1, 0),
    ]
    assert class_errors.confused_pairs(scores, labels, mask, top=1) == [
        class_errors.Pair(0, 1, 3, 2, 1)
    ]
    # Without the mask, image 5 confuses {cat, car} once too; its tie with {car, bus} goes to
    # the lower pair, (0, 2).
    assert class_errors.confused_pairs(scores, labels, None) == [
        class_errors.Pair(0, 1, 3, 2, 1),
        class_errors.Pair(0, 2, 1, 0, 1),
        class_errors.Pair(2, 3, 1, 1, 0),
    ]


def test_worst_examples_on_a_made_matrix():
    # Class 0's column: negatives at rows 0 (0.95), 1 (0.40), 3 (0.95), 5 (0.70, masked), 6 (0.5)
    # positives at rows 2 (0.10), 4 (0.45), 7 (0.90), 8 (0.10).
    col = [0.95, 0.40, 0.10, 0.95, 0.45, 0.70, 0.50, 0.90, 0.10]
    truth = [0, 0, 1, 0, 1, 0, 0, 1, 1]
    scores = np.stack([col, np.full(9, 0.5)], axis=1)
    labels = np.stack([truth, np.zeros(9)], axis=1)
    mask = np.ones((9, 2), bool)
    mask[5, 0] = False
    (m, other) = class_errors.worst_examples(scores, labels, mask, [0, 1], k=2)
    assert m.cls == 0
    assert m.false_positives.tolist() == [0, 3]  # 0.95 twice: the lower row first
    assert m.fp_scores.tolist() == [0.95, 0.95]
    assert m.false_negatives.tolist() == [2, 8]  # 0.10 twice
    assert m.fn_scores.tolist() == [0.10, 0.10]
    (m3,) = class_errors.worst_examples(scores, labels, mask, [0], k=3)
    assert m3.false_positives.tolist() == [0, 3, 6]  # 0.5 is a prediction; 5 is masked
    assert m3.false_negatives.tolist() == [2, 8, 4]
    assert other.false_positives.tolist() == [0, 1] and other.false_negatives.size == 0


# ---------------------------------------------------------------------------------------------
# The report of a run, and of runs it can draw only in part
# ---------------------------------------------------------------------------------------------
def test_report_of_a_demo_run(demo_report):
    workdir, out, err = demo_report
    text = (workdir / "report.html").read_text()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == (
        f"{workdir}: drew the run; training curves (training loss, learning rate, evaluation "
        "mAP, other mAPs); the evaluation at step 4 (EMA model: metrics, per-class AP, "
        "precision-recall curves, confused pairs, worst examples)"
    )
    size = (workdir / "report.html").stat().st_size
    assert re.fullmatch(rf"wrote {workdir}/report\.html \(\d+\.\d KiB\) in \d+\.\d s", lines[1])
    assert f"({size / 1024:.1f} KiB)" in lines[1]
    # Self-contained: every image inline, nothing else referenced.
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) >= 10
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert not re.search(r"(src|href)=\"(?!data:|#)", text)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    for key in ("run", "curves", "evaluation", "classes", "pr", "pairs", "examples"):
        assert f'<section id="{key}">' in text
    assert "<details><summary>config</summary>" in text


def copy_run(workdir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(workdir, target, ignore=shutil.ignore_patterns("report.html"))
    return target


def report_lines(workdir, capsys, *args):
    status = viz_cli.main(["report", "--workdir", str(workdir), *args])
    printed = capsys.readouterr()
    return status, printed.out.splitlines(), printed.err.splitlines()


def test_a_run_without_evaluations_or_checkpoints_says_what_it_drew(demo_report, tmp_path, capsys):
    source, _, _ = demo_report
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(source / "config.json", w)
    records = run_log.read_records(source)
    write_log(w / "metrics.jsonl", [r for r in records if "train/loss" in r])
    status, out, err = report_lines(w, capsys)
    assert status == 0
    assert err == [
        "warning: report: the evaluation at a step, example images and the method's figures "
        f"not drawn: --workdir {w}: no checkpoints in {w}/checkpoints",
        f"warning: report: wall time and images/s not drawn: no TensorBoard events in "
        f"{w}/tensorboard",
        f"warning: report: mAP curves not drawn: {w}/metrics.jsonl holds no evaluation (the run "
        "stopped before its first, at config.eval_every_steps)",
    ]
    assert out[0] == f"{w}: drew the run; training curves (training loss, learning rate)"
    text = (w / "report.html").read_text()
    assert text.count('<p class="missing">') == 3 + 2  # the list on top, and in its section


def test_an_unreadable_checkpoint_says_what_it_drew(demo_report, tmp_path, capsys):
    w = copy_run(demo_report[0], tmp_path / "w")
    for array_file in (w / "checkpoints" / "4" / "state").rglob("d/*"):
        array_file.write_bytes(array_file.read_bytes()[: array_file.stat().st_size // 2])
    (w / "metrics.jsonl").unlink()  # and no log either
    status, out, err = report_lines(w, capsys)
    assert status == 0
    assert err[0] == (
        f"warning: report: training curves not drawn: {w}/metrics.jsonl does not exist"
    )
    head = (
        "warning: report: the evaluation at a step, example images and the method's figures "
        f"not drawn: {w}/checkpoints: cannot read step 4: "
    )
    assert len(err) == 2 and err[1].startswith(head) and err[1].endswith("; saved steps: 4")
    assert "\n" not in err[1]
    assert out[0] == f"{w}: drew the run"
    assert (w / "report.html").stat().st_size > 0
    # A step asked for is that step or an error.
    status, out, err = report_lines(w, capsys, "--step", "4", "--output", str(tmp_path / "r.html"))
    assert status == 2 and out == [] and len(err) == 1
    assert err[0].startswith(f"error: {w}/checkpoints: cannot read step 4: ")
    assert not (tmp_path / "r.html").exists()


def test_no_workdir_is_an_error(tmp_path, capsys):
    status, out, err = report_lines(tmp_path / "none", capsys)
    assert (status, out, err) == (2, [], [f"error: --workdir {tmp_path}/none: does not exist"])
    status, out, err = report_lines(tmp_path, capsys)
    assert (status, out) == (2, [])
    assert err == [
        f"error: --workdir {tmp_path}: no config.json, metrics.jsonl or checkpoints/ in it; not "
        "a training workdir (the folder given to python -m mlgraph.main --workdir)"
    ]
    assert list(tmp_path.iterdir()) == []
    for flags, line in [
        (["--classes", "cat"], "error: --classes: only for heatmap, cam and attention"),
        (["--classes_file", "x"], "error: --classes_file: only for heatmap, labelcloud, cam "
         "and attention"),
        (["--top", "3"], "error: --top: only for heatmap"),
    ]:  # fmt: skip
        assert report_lines(tmp_path, capsys, *flags) == (2, [], [line])

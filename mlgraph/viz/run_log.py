"""What a run's logs say, for the report: the curves of `metrics.jsonl` and the wall time and
training speed of its TensorBoard events.

`metrics.jsonl` (`mlgraph.metric_writer`) holds one JSON object a line, `{"step": s, name:
value, ...}`; a step has a training line and, at an evaluation, an evaluation line. A run
resumed from a checkpoint writes the steps after it again (the writer cuts the old lines, but a
log copied from an older mlgraph, or joined from two machines, may hold them twice): each
(name, step) is kept once, the later line winning, as TensorBoard draws a resumed run.

The TensorBoard event files beside it (`DIR/tensorboard/events.out.tfevents.*`, one per
session of the run) stamp every value with the wall-clock time it was written, which
`metrics.jsonl` does not keep: they give the run's wall time and its training images/s.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from mlgraph import paths
from mlgraph.errors import WorkdirError
from mlgraph.metric_writer import METRICS_FILE, TENSORBOARD_DIR, read_metrics

# The curves the report draws, by panel: (title, y label, key pattern). `train/lr` has its
# own panel; the loss panel takes the loss and its parts (`train/bce`, SALGL's `train/scene`).
MAIN_MAP = re.compile(r"^(eval|val)/(ema_)?mAP$")
# spml_mAP, and a method's views (SigRL's zsl_mAP, gzsl_mAP), model and EMA.
OTHER_MAP = re.compile(r"^(eval|val)/(ema_)?[a-z0-9]+_mAP$")
LR = "train/lr"


@dataclasses.dataclass(frozen=True)
class Curve:
    """One logged value over steps: `steps` int64 [T] ascending, `values` float64 [T]."""

    name: str
    steps: np.ndarray
    values: np.ndarray


def read_records(workdir: epath.Path) -> list[dict] | None:
    """The records of `workdir/metrics.jsonl` (`metric_writer.read_metrics`), or None when
    there is no such file.

    Raises:
      WorkdirError: a line (but a torn last one) that is not a JSON object with an integer
        `step`.
    """
    path = workdir / METRICS_FILE
    with paths.faults_as_errors(path, f"read {path}"):
        if not path.exists():
            return None
        try:
            records = read_metrics(workdir)
        except ValueError as e:
            where = _bad_line(path.read_text())
            raise WorkdirError(f"{path}: {where} is not JSON ({e}); {LINE}") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise WorkdirError(f"{path}: record {number} has no integer 'step'; {LINE}")
    return records


LINE = 'expected one JSON object a line, {"step": N, "name": value, ...}'


def _bad_line(text: str) -> str:
    """'line N', the first line of `text` that is not JSON (blank lines are skipped)."""
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except ValueError:
            return f"line {number}"
    return "a line"


def curves(records: Sequence[Mapping]) -> dict[str, Curve]:
    """Every numeric value of `records` as a curve over steps, each (name, step) once: where a
    step was logged twice (a resumed run), the later record's value wins. Names in the order
    they first appear."""
    latest: dict[str, dict[int, float]] = {}
    for record in records:
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                latest.setdefault(name, {})[step] = float(value)
    out = {}
    for name, by_step in latest.items():
        steps = np.fromiter(by_step, np.int64, len(by_step))
        values = np.fromiter(by_step.values(), np.float64, len(by_step))
        order = np.argsort(steps, kind="stable")
        out[name] = Curve(name, steps[order], values[order])
    return out


def panels(found: Mapping[str, Curve]) -> list[tuple[str, str, list[Curve]]]:
    """The report's training-curve panels from `curves`' output, those with a curve only:
    (title, y label, curves) for the loss (`train/*` but the learning rate and the counts),
    the counts a method logs per step (a `train/` value that is a whole number at every step
    and not always 0: SigRL's `kept_images`, Scob's `contrastive_skips`, `skipped`; on the
    loss's axis they would flatten it), the learning rate, the mAP of each evaluation (model
    and EMA) and the other mAPs the method logs (`spml_mAP`; SigRL's ZSL and GZSL views)."""
    train = [c for n, c in found.items() if n.startswith("train/") and n != LR]
    counts = [c for c in train if c.name != "train/loss" and _is_count(c.values)]
    losses = [c for c in train if c not in counts]
    # The total first: it is drawn boldest.
    losses.sort(key=lambda c: c.name != "train/loss")
    out = [
        ("training loss", "loss (and other train/ values)", losses),
        ("training counts", "count per logged step", counts),
        ("learning rate", "learning rate", [found[LR]] if LR in found else []),
        ("evaluation mAP", "mAP (%)", [c for n, c in found.items() if MAIN_MAP.match(n)]),
        (
            "other mAPs",
            "mAP (%)",
            [c for n, c in found.items() if OTHER_MAP.match(n) and not MAIN_MAP.match(n)],
        ),
    ]
    return [p for p in out if p[2]]


def _is_count(values: np.ndarray) -> bool:
    return bool(np.all(values == np.round(values)) and np.any(values != 0))


def best_evaluation(found: Mapping[str, Curve], metric: str) -> tuple[int, float] | None:
    """(step, value) of the highest `metric` logged (the earliest step of a tie), or None when
    it was never logged (or only as NaN)."""
    curve = found.get(metric)
    if curve is None or np.isnan(curve.values).all():
        return None
    i = int(np.nanargmax(curve.values))
    return int(curve.steps[i]), float(curve.values[i])


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int = 2000) -> np.ndarray:
    """Indices of the points to draw of a curve of T points: all of them when T <= max_points,
    else the first and last point and the lowest and highest value of each of max_points / 2
    runs of consecutive points, so that a drawn curve keeps every spike (min/max decimation).
    Ascending, without repeats; NaN values count as neither lowest nor highest."""
    n = len(steps)
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, max_points // 2)
    width = -(-n // buckets)
    padded = np.full(buckets * width, np.nan)
    padded[:n] = values
    grid = padded.reshape(buckets, width)
    nan = np.isnan(grid)
    offsets = np.arange(buckets) * width
    lo = np.where(nan, np.inf, grid).argmin(axis=1) + offsets
    hi = np.where(nan, -np.inf, grid).argmax(axis=1) + offsets
    picked = np.concatenate([[0, n - 1], np.minimum(lo, n - 1), np.minimum(hi, n - 1)])
    return np.unique(picked)


# ---------------------------------------------------------------------------------------------
# Wall time and speed, from the TensorBoard events
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Session:
    """One process's stretch of a run (one event file): `start` and `end` wall-clock seconds
    (its first and last event), and the first and last logged training step with their times
    (None when it logged none)."""

    start: float
    end: float
    first_train: tuple[int, float] | None
    last_train: tuple[int, float] | None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """(the protobuf varint at `data[i:]`, the index after it)."""
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of each protobuf field of `data[start:end]`: a varint
    as an int, fixed64 as 8 bytes, a length-delimited field as (its start, its end)."""
    i, end = start, len(data) if end is None else end
    while i < end:
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 2:
            length, i = _varint(data, i)
            value, i = (i, i + length), i + length
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, wire, value


def _event(data: bytes, start: int, end: int) -> tuple[int, float, list[str]]:
    """(step, wall time, scalar names) of the `Event` proto in `data[start:end]` (TensorBoard's
    event.proto: 1 wall_time double, 2 step int64, 5 summary; Summary: 1 repeated value;
    Summary.Value: 1 tag). Read by hand: tensorboardX's generated classes import torch, seconds
    for what takes microseconds here."""
    step, wall, tags = 0, 0.0, []
    for number, wire, value in _fields(data, start, end):
        if number == 1 and wire == 1:
            (wall,) = struct.unpack("<d", value)
        elif number == 2 and wire == 0:
            step = value
        elif number == 5 and wire == 2:
            values = [v for n, w, v in _fields(data, *value) if n == 1 and w == 2]
            for v in values:
                tags += [
                    data[slice(*t)].decode() for n, w, t in _fields(data, *v) if n == 1 and w == 2
                ]
    return step, wall, tags


def _records(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the payload of each complete record of TFRecord bytes (an 8-byte
    length, its 4-byte CRC, the payload, its 4-byte CRC; the CRCs are not checked); a record
    cut short (a run killed while writing it) ends the list."""
    out, i, size = [], 0, len(data)
    while i + 12 <= size:
        (length,) = struct.unpack_from("<Q", data, i)
        end = i + 12 + length
        if end + 4 > size:
            break
        out.append((i + 12, end))
        i = end + 4
    return out


def read_session(data: bytes) -> Session | None:
    """The `Session` of one event file's bytes, or None when it has no timed event. Events
    without a time (TensorBoard's markers of a resumed run) are left out. Events are in time
    order in a file, so only the first and last few are decoded: the file of a 100,000-step
    log reads in a fraction of a second.

    Raises:
      ValueError: bytes that are not TensorBoard events.
    """
    records = list(enumerate(_records(data)))

    def first(rows, train: bool) -> tuple[int, float] | None:
        for n, (start, end) in rows:
            try:
                step, wall, tags = _event(data, start, end)
            except (IndexError, ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"record {n + 1} is not a TensorBoard event ({e})") from None
            if wall > 0 and (not train or any(t.startswith("train/") for t in tags)):
                return step, wall
        return None

    begin = first(records, train=False)
    if begin is None:
        return None
    return Session(
        start=begin[1],
        end=first(reversed(records), train=False)[1],
        first_train=first(records, train=True),
        last_train=first(reversed(records), train=True),
    )


def read_sessions(workdir: epath.Path) -> list[Session]:
    """The `Session` of each TensorBoard event file in `workdir/tensorboard`, by start time;
    [] without any.

    Raises:
      WorkdirError: a file that is not TensorBoard events.
    """
    folder = workdir / TENSORBOARD_DIR
    with paths.faults_as_errors(folder, f"read {folder}"):
        if not folder.is_dir():
            return []
        files = sorted(p for p in folder.iterdir() if p.name.startswith("events.out.tfevents."))
        found = []
        for p in files:
            try:
                found.append(read_session(p.read_bytes()))
            except ValueError as e:
                raise WorkdirError(f"{p}: {e}") from None
    return sorted((s for s in found if s is not None), key=lambda s: s.start)


def wall_time(sessions: Sequence[Session]) -> float:
    """The run's wall time in seconds: the sum over its sessions of first to last event (the
    time between a stop and its resumption is not counted)."""
    return float(sum(s.end - s.start for s in sessions))


def train_images_per_s(sessions: Sequence[Session], batch_size: int) -> float | None:
    """Training images/s: the steps between each session's first and last logged training
    step, times `batch_size`, over the seconds between them (so the first step's compilation
    is left out and the evaluations in between are in); None without two logged steps in a
    session."""
    steps = seconds = 0.0
    for s in sessions:
        if s.first_train and s.last_train and s.last_train[1] > s.first_train[1]:
            steps += s.last_train[0] - s.first_train[0]
            seconds += s.last_train[1] - s.first_train[1]
    return steps * batch_size / seconds if seconds > 0 else None

"""Process-0 metric logs: one JSON object a line in `metrics.jsonl`, and TensorBoard events.

A resumed run continues the logs from its restored step: the lines a stopped or killed run
wrote after its last checkpoint are cut from `metrics.jsonl` (the resumed run writes those steps
again, with the same values), and TensorBoard is told to drop its events from those steps
(a session start at the next step), so that every step is logged once.

Both are written on the caller's thread, so that a write that fails (a full disk, a read-only
or unreachable workdir) stops the run with one line naming the file (`StorageError`) instead
of a traceback from a writer thread; everything written before it is kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import time
from collections.abc import Mapping

import jax

from mlgraph import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# What to do once a failed write's cause is mended: the run's checkpoints are all kept.
RESUME = "then run the same command to resume from the last checkpoint"
# A metric may be NaN by definition (OF1 when nothing is predicted): tensorboardX warns on
# every such scalar, TensorBoard shows it as it is.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines and scalar TensorBoard summaries.

    Args:
      workdir: the run's folder.
      resume_step: the step the run continues from (0 when no checkpoint was restored; None
        to keep the file as it is): lines of later steps are removed first, and TensorBoard
        purges its events from later steps.

    Raises:
      StorageError: (here and in `write`) a file cannot be written: one line naming it.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = paths.path(workdir, "--workdir") / METRICS_FILE
        self._tb = None
        if self.enabled:
            # Step 0 included: a run killed before its first checkpoint left lines that the
            # new run writes again.
            if resume_step is not None:
                with paths.faults_as_errors(self.path, then=RESUME):
                    truncate_metrics(workdir, resume_step)
            self._tb = _Events(self.path.parent / TENSORBOARD_DIR, resume_step)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` at `step` (a no-op on processes other than 0)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        with paths.faults_as_errors(self.path, needed=len(line.encode()), then=RESUME):
            paths.append_text(self.path, line)
        self._tb.write(step, scalars)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._tb is not None:
            self._tb.close()


class _Events:
    """A TensorBoard event file in `logdir`, written and flushed on the caller's thread
    (tensorboardX's `SummaryWriter` writes from a thread of its own, where an error would end
    that thread with a traceback and leave the run logging nowhere).

    `resume_step`: as `MetricWriter`'s; TensorBoard hides the events of earlier runs from the
    step after it on (tensorboardX's `purge_step`).
    """

    def __init__(self, logdir: pathlib.Path, resume_step: int | None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter, directory_check

        if paths.is_cloud(logdir):
            paths.register_tensorboard()
        self.logdir = logdir
        # The name tensorboardX gives an event file.
        name = f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}"
        with paths.faults_as_errors(logdir, then=RESUME):
            directory_check(os.fspath(logdir))
            self._file = RecordWriter(os.fspath(logdir / name))
            try:
                events = [Event(wall_time=time.time(), file_version="brain.Event:2")]
                if resume_step is not None:
                    purge = int(resume_step) + 1
                    start = SessionLog(status=SessionLog.START)
                    events += [
                        Event(step=purge, file_version="brain.Event:2"),
                        Event(step=purge, session_log=start),
                    ]
                self._add(events)
            except Exception:
                self.close()  # else the file's collection reports the failed flush again
                raise

    def _add(self, events: list) -> None:
        for event in events:
            self._file.write(event.SerializeToString())
        self._file.flush()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One scalar summary event per value at `step`, then a flush."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        events = [
            Event(summary=scalar(name, float(value)), step=int(step), wall_time=now)
            for name, value in scalars.items()
        ]
        with paths.faults_as_errors(self.logdir, then=RESUME):
            self._add(events)

    def close(self) -> None:
        """Close the file. Every `write` flushed already, so a failure here loses nothing,
        and must not hide the error that ended the run (close runs as the run unwinds)."""
        with contextlib.suppress(OSError, ValueError):
            self._file.close()


def _records(text: str) -> list[dict]:
    """The JSON lines of `text`; a torn last line (a run killed while writing it) is dropped."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """Every record of a workdir's metrics.jsonl (empty when there is none)."""
    path = paths.path(workdir, "--workdir") / METRICS_FILE
    if not path.exists():
        return []
    return _records(path.read_text())


def truncate_metrics(workdir: str | pathlib.Path, step: int) -> None:
    """Keep only the records of steps up to `step` in metrics.jsonl (replaced atomically; the
    file is not touched when there is nothing to cut)."""
    path = paths.path(workdir, "--workdir") / METRICS_FILE
    if not path.exists():
        return
    text = path.read_text()
    kept = [r for r in _records(text) if r["step"] <= step]
    new = "".join(json.dumps(r) + "\n" for r in kept)
    if new == text:
        return
    paths.replace_text(path, new)

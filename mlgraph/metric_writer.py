"""Process-0 metric logs: one JSON object a line in `metrics.jsonl`, and TensorBoard events.

A resumed run continues the logs from its restored step: the lines a stopped or killed run
wrote after its last checkpoint are cut from `metrics.jsonl` (the resumed run writes those steps
again, with the same values), and TensorBoard is told to drop its events from those steps
(`purge_step`), so that every step is logged once.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping

import jax

from mlgraph import paths

METRICS_FILE = "metrics.jsonl"
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
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = paths.path(workdir, "--workdir") / METRICS_FILE
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            purge = None
            # Step 0 included: a run killed before its first checkpoint left lines that the
            # new run writes again.
            if resume_step is not None:
                truncate_metrics(workdir, resume_step)
                purge = int(resume_step) + 1
            if paths.is_cloud(self.path):
                paths.register_tensorboard()
            self._tb = SummaryWriter(os.fspath(self.path.parent / "tensorboard"), purge_step=purge)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` at `step` (a no-op on processes other than 0)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        paths.append_text(self.path, json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._tb is not None:
            self._tb.close()


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

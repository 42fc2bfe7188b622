"""The launch scripts pass a preemption's SIGTERM through to the training processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from train_helpers import REPO

# Stands in for SLURM's srun: runs a "task" that records the signal it gets and exits 0, as a
# training run does after its checkpoint.
FAKE_SRUN = """#!/usr/bin/env bash
trap 'echo "task got SIGTERM" > "$RECORD"; exit 0' TERM
echo started > "$RECORD"
while true; do sleep 0.1; done
"""


def test_slurm_script_passes_sigterm_to_the_tasks(tmp_path):
    (tmp_path / "srun").write_text(FAKE_SRUN)
    (tmp_path / "srun").chmod(0o755)
    record = tmp_path / "record.txt"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", RECORD=str(record))
    script = REPO / "launch" / "slurm.sbatch"
    proc = subprocess.Popen(["bash", str(script), "--workdir", "w"], env=env, cwd=tmp_path)
    deadline = time.time() + 30
    while not (record.exists() and record.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@300` sends the script
    assert proc.wait(timeout=30) == 0
    assert record.read_text() == "task got SIGTERM\n"
    assert (REPO / "launch" / "tpu_run.sh").read_text().count("exec env MLGRAPH_DISTRIBUTED=1") == 1

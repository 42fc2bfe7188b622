"""The launch scripts pass a preemption's SIGTERM through to the training processes, and their
--dry_run prints what each worker would run."""

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
    # The script traps TERM before it starts srun: signal it only once the fake srun runs
    # (on a loaded 2-core host that took over 30 s).
    deadline = time.time() + 180
    while not (record.exists() and record.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    assert record.exists() and record.read_text().strip(), "the fake srun never started"
    proc.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@300` sends the script
    assert proc.wait(timeout=30) == 0
    assert record.read_text() == "task got SIGTERM\n"
    assert (REPO / "launch" / "tpu_run.sh").read_text().count("exec env MLGRAPH_DISTRIBUTED=1") == 1


def _run(script: str, *args: str, **env: str) -> list[str]:
    """The stdout lines of `bash launch/<script> args` (status 0 asserted)."""
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


TRAIN = ["mlgraph.main", "--config", "configs/salgl_coco.py", "--workdir", "gs://B/run"]


def test_tpu_pod_dry_run_prints_each_workers_command_and_runs_nothing(tmp_path):
    # No gcloud on PATH: a dry run with WORKERS set must not call it.
    lines = _run("tpu_pod.sh", "--dry_run", *TRAIN, TPU="pod", ZONE="z", WORKERS="2")
    assert lines[0].startswith("copy: gcloud compute tpus tpu-vm scp --recurse --zone=z")
    assert "--worker=all --command" in lines[1] and "launch/tpu_run.sh mlgraph.main" in lines[1]
    expected = (
        "cd ~/mlgraph && env MLGRAPH_DISTRIBUTED=1 MLGRAPH_DATA='' ~/mlgraph_venv/bin/python -m "
        "mlgraph.main --config configs/salgl_coco.py --workdir gs://B/run"
    )
    assert lines[2:] == [f"worker 0: {expected}", f"worker 1: {expected}"]


def test_tpu_run_dry_run_prints_the_exec_and_creates_no_venv(tmp_path):
    venv = tmp_path / "venv"
    lines = _run("tpu_run.sh", "--dry_run", *TRAIN, MLGRAPH_VENV=str(venv), TPU_WORKER_ID="3")
    assert lines[0].startswith("worker 3 (")
    assert lines[0].endswith(
        f"env MLGRAPH_DISTRIBUTED=1 MLGRAPH_DATA='' {venv}/bin/python -m mlgraph.main "
        "--config configs/salgl_coco.py --workdir gs://B/run"
    )
    assert "pip install -e '.[tpu,gcs]'" in lines[1] and not venv.exists()


def test_slurm_dry_run_lists_every_task():
    lines = _run(
        "slurm.sbatch",
        "--dry_run",
        "--workdir",
        "/shared/run",
        NODES="2",
        SLURM_NTASKS_PER_NODE="2",
    )
    assert lines[0].startswith("srun --ntasks-per-node=2 ")
    assert len(lines) == 5
    assert lines[4] == (
        "task 3 (node 1, local 1): env SLURM_PROCID=3 SLURM_LOCALID=1 MLGRAPH_DISTRIBUTED=1 "
        "python -m mlgraph.main --workdir /shared/run"
    )

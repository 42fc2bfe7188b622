"""Two processes x 2 CPU devices train exactly like one process with 4 devices, and stop on a
SIGTERM to one of them at a step they agree on."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from train_helpers import REPO, final_state, wait_for

from mlgraph.metric_writer import read_metrics

HERE = os.path.dirname(__file__)
# Cooperating processes (gloo collectives, a shared coordinator): the README's test command runs
# these alone after the parallel part, since a busy second worker has stalled them.
pytestmark = pytest.mark.multiprocess


def start_workers(data_dir, workdir, total_steps: int = 4) -> list[subprocess.Popen]:
    """The two processes of `multihost_worker.py` (this checkout's mlgraph, 2 devices each)."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    worker = os.path.join(HERE, "multihost_worker.py")
    return [
        subprocess.Popen(
            [sys.executable, worker, str(port), str(i), str(data_dir), str(workdir)]
            + [str(total_steps)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """The processes' outputs, once both exited with status 0."""
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


TOTAL = 8  # steps of every run here


@pytest.fixture(scope="module")
def two_processes(tiny_coco_dir, tmp_path_factory):
    """(workdir, outputs) of an uninterrupted two-process run."""
    workdir = tmp_path_factory.mktemp("two_processes") / "multi"
    return workdir, finish(start_workers(tiny_coco_dir, workdir, TOTAL))


def test_two_processes_equal_one(two_processes, tmp_path, tiny_coco_dir):
    multi_dir, outs = two_processes
    assert "on 4 device(s)" in outs[0]

    # The same run in one process over 4 devices.
    code = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from train_helpers import tiny_config\nfrom mlgraph import train\n"
        "c = tiny_config({!r}, total_steps={}); c.eval_every_steps = 4\n"
        "c.checkpoint_every_steps = 2\n"
        "train.run(c, {!r})\n".format(HERE, str(tiny_coco_dir), TOTAL, str(tmp_path / "single"))
    )
    single = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, JAX_NUM_CPU_DEVICES="4"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    multi, one = read_metrics(multi_dir), read_metrics(tmp_path / "single")
    loss_m = [r["train/loss"] for r in multi if "train/loss" in r]
    loss_1 = [r["train/loss"] for r in one if "train/loss" in r]
    assert len(loss_m) == TOTAL
    # Same global batches (each process reads every other example of the one global stream),
    # so the same losses up to the order of float reductions.
    np.testing.assert_allclose(loss_m, loss_1, rtol=1e-4)
    # Evaluation pads the uneven shards (7 + 6 images) and counts every image once.
    eval_m = [r for r in multi if "eval/mAP" in r][-1]
    eval_1 = [r for r in one if "eval/mAP" in r][-1]
    # Evaluation pads the uneven shards (7 + 6 images) and counts every image once. (Metrics are
    # not compared: after a few steps the tiny model's scores are nearly tied, and float-level
    # weight differences swap ranks.)
    assert eval_m["eval/images"] == eval_1["eval/images"] == 13


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step(two_processes, tmp_path, tiny_coco_dir):
    procs = start_workers(tiny_coco_dir, tmp_path / "w", TOTAL)
    wait_for(procs[0].stdout, f"step 3/{TOTAL}")  # only process 0 prints
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host
    out = finish(procs)[0]
    step = final_state(tmp_path / "w")[0]
    assert 3 <= step < TOTAL
    assert out.strip().splitlines()[-1] == (
        f"a preemption notice (SIGTERM to one of the processes): stopped at step {step}/{TOTAL} "
        "with a checkpoint; run the same command to resume"
    )

    finish(start_workers(tiny_coco_dir, tmp_path / "w", TOTAL))
    (step_a, a), (step_b, b) = final_state(two_processes[0]), final_state(tmp_path / "w")
    assert step_a == step_b == TOTAL
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert read_metrics(two_processes[0]) == read_metrics(tmp_path / "w")

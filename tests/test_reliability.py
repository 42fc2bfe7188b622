"""Faults real clusters produce: SIGTERM, kill -9, a damaged checkpoint, two runs on one
workdir, a diverging run. Each loses at most the current step, says so in one line, and the
resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import REPO, final_state, tiny_config, wait_for

from mlgraph import (
    bench_compile,
    checkpointing,
    divergence,
    recipes,
    train,
    train_state,
    train_step,
    workdir_lock,
)
from mlgraph.errors import WorkdirError
from mlgraph.metric_writer import read_metrics

TOTAL = 8  # steps; evaluated at 4 and 8, checkpointed every 2


def config_of(data_dir, **changes):
    c = tiny_config(data_dir, total_steps=TOTAL)
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    c.update(changes)
    return c


# The same config as `config_of`, on the command line.
CLI_FLAGS = [
    "--config.data.name=coco2014",
    "--config.image_size=32",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
    f"--config.total_steps={TOTAL}",
    "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
    "--config.model.backbone_kwargs.widths=(8, 16)",
]


def start_cli(workdir, data_dir, *extra) -> subprocess.Popen:
    """`python -m mlgraph.main` on the tiny set, as a user starts it (8 devices, like the
    in-process runs, so that results compare bit for bit)."""
    cmd = [sys.executable, "-m", "mlgraph.main", "--config", "configs/baseline_demo.py"]
    cmd += ["--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *CLI_FLAGS, *extra]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_same_run(a, b):
    """The final checkpoints equal bit for bit and every metrics line is the same, once."""
    step_a, state_a = final_state(a)
    step_b, state_b = final_state(b)
    assert step_a == step_b == TOTAL
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    assert read_metrics(a) == read_metrics(b)


@pytest.fixture(scope="module")
def uninterrupted(tiny_coco_dir, tmp_path_factory):
    """The workdir of the run every interrupted one must reproduce."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "w"
    train.run(config_of(tiny_coco_dir), workdir)
    return workdir


def test_sigterm_checkpoints_and_resumes_exactly(tiny_coco_dir, uninterrupted, tmp_path):
    proc = start_cli(tmp_path / "w", tiny_coco_dir)
    wait_for(proc.stdout, f"step 3/{TOTAL}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    last = out.strip().splitlines()[-1]
    step = final_state(tmp_path / "w")[0]
    assert 3 <= step < TOTAL
    assert last == (
        f"SIGTERM: stopped at step {step}/{TOTAL} with a checkpoint; run the same command to resume"
    )
    assert not (tmp_path / "w" / workdir_lock.LOCK_FILE).exists()

    train.run(config_of(tiny_coco_dir), tmp_path / "w")
    assert_same_run(tmp_path / "w", uninterrupted)


# slow: subprocess runs; SIGTERM's checkpoint and resume are in CI
@pytest.mark.slow
def test_second_sigint_exits_at_once(tiny_coco_dir, tmp_path):
    proc = start_cli(tmp_path / "w", tiny_coco_dir)
    wait_for(proc.stdout, "training baseline")
    proc.send_signal(signal.SIGINT)
    wait_for(proc.stderr, "SIGINT: stopping after this step with a checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.strip().splitlines()[-1] == (
        "SIGINT again: exiting now; the run resumes from its last checkpoint"
    )
    assert not (tmp_path / "w" / workdir_lock.LOCK_FILE).exists()


def _tensorboard_events(path) -> list[bytes]:
    """The records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        records.append(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
    return records


# slow: subprocess runs; test_stale_lock_of_a_lost_machine takes a lock over in CI
@pytest.mark.slow
def test_kill9_resume_takes_over_the_lock_and_logs_each_step_once(
    tiny_coco_dir, uninterrupted, tmp_path, capsys
):
    proc = start_cli(tmp_path / "w", tiny_coco_dir)
    wait_for(proc.stdout, f"step 5/{TOTAL}")  # past the checkpoint at 4
    proc.kill()
    proc.communicate(timeout=60)
    logged = [r["step"] for r in read_metrics(tmp_path / "w")]
    checkpointed = final_state(tmp_path / "w")[0]
    assert max(logged) > checkpointed  # lines the resumed run writes again
    holder = json.loads((tmp_path / "w" / workdir_lock.LOCK_FILE).read_text())
    assert holder["pid"] == proc.pid

    train.run(config_of(tiny_coco_dir), tmp_path / "w")
    assert (
        f"warning: --workdir {tmp_path / 'w'}: taking over the lock of a run that is gone "
        f"({workdir_lock.describe(holder)}; its process no longer exists)"
    ) in capsys.readouterr().err.splitlines()
    assert_same_run(tmp_path / "w", uninterrupted)
    # TensorBoard drops the killed run's events past the restored step: the resumed run's
    # event file opens with a session start at the next step.
    files = sorted((tmp_path / "w" / "tensorboard").iterdir())
    assert len(files) == 2
    from tensorboardX.proto import event_pb2

    events = [event_pb2.Event.FromString(r) for r in _tensorboard_events(files[1])]
    starts = [(e.step, e.session_log.status) for e in events if e.HasField("session_log")]
    assert starts == [(checkpointed + 1, event_pb2.SessionLog.START)]


def test_a_run_killed_before_its_first_checkpoint_leaves_no_lines(tmp_path):
    from mlgraph.metric_writer import MetricWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 25, "train/loss": 0.3}\n')
    writer = MetricWriter(tmp_path, resume_step=0)  # no checkpoint: the run starts again
    writer.write(25, {"train/loss": 0.25})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 25, "train/loss": 0.25}]


def test_second_run_on_a_held_workdir_exits_2(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    lock = workdir_lock.WorkdirLock(workdir)  # held by this (live) test process
    lock.acquire()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mlgraph.main", "--config", "configs/baseline_demo.py"]
            + ["--workdir", str(workdir)],
            cwd=REPO,
            # One device: the config's checks, which come first, pass (eval batch 100).
            env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        holder = json.loads(lock.path.read_text())
    finally:
        lock.release()
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: --workdir {workdir}: in use by another run ({workdir_lock.describe(holder)}; "
        f"{lock.path}); wait for it to end or use another workdir"
    )
    assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written, lock gone


def test_stale_lock_of_a_lost_machine(tmp_path, monkeypatch):
    workdir = tmp_path / "w"
    workdir.mkdir()
    lock_file = workdir / workdir_lock.LOCK_FILE
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(WorkdirError, match="in use by another run .host elsewhere, pid 1"):
        workdir_lock.WorkdirLock(workdir).acquire()
    old = time.time() - workdir_lock.STALE_S - 60
    os.utime(lock_file, (old, old))
    lock = workdir_lock.WorkdirLock(workdir)
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_unreadable_checkpoint_falls_back_to_the_older_one(
    tiny_coco_dir, uninterrupted, tmp_path, capsys
):
    train.run(config_of(tiny_coco_dir, stop_at_step=6), tmp_path / "w")
    ckpts = tmp_path / "w" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [4, 6]  # latest 2, best (4)
    for array_file in (ckpts / "6" / "state").rglob("d/*"):  # every array file cut in half
        array_file.write_bytes(array_file.read_bytes()[: array_file.stat().st_size // 2])
    capsys.readouterr()

    train.run(config_of(tiny_coco_dir), tmp_path / "w")
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1
    moved = tmp_path / "w" / checkpointing.UNREADABLE_DIR / "6"
    assert warning[0].startswith(f"warning: checkpoint step 6 in {ckpts} cannot be read (")
    assert warning[0].endswith(f"); moved it to {moved}; resuming from step 4")
    assert (moved / "state").is_dir()  # kept, out of the way
    assert_same_run(tmp_path / "w", uninterrupted)


def test_learning_rate_1e30_stops_with_the_last_good_checkpoint(tiny_coco_dir, tmp_path):
    config = config_of(tiny_coco_dir, checkpoint_every_steps=1)
    config.optimizer.lr = 1e30
    with pytest.raises(divergence.DivergenceError) as e:
        train.run(config, tmp_path / "w")
    message = str(e.value)
    # Step 1 makes the weights huge, step 2's update is not finite (its loss may still be).
    assert re.fullmatch(
        r"step 2: (loss is nan|the update is not finite \(loss \S+\))", message.split(";")[0]
    )
    assert message.endswith(
        "; last good checkpoint step 1; lower config.optimizer.lr in a new workdir, or run "
        "again with --config.optimizer.skip_nonfinite=True to skip such updates"
    )
    step, good = final_state(tmp_path / "w")
    assert step == 1  # nothing after the bad step was saved
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))
    assert [r["step"] for r in read_metrics(tmp_path / "w")] == [1]


def test_skip_nonfinite_finishes_the_run(tiny_coco_dir, tmp_path):
    config = config_of(tiny_coco_dir)
    config.model = recipes.model_config(
        "toy.nonfinite", backbone="simple_cnn", backbone_kwargs={"widths": (8, 16)}
    )
    with pytest.raises(
        divergence.DivergenceError, match=r"^step (1|2): loss is nan; no checkpoint"
    ):
        train.run(config, tmp_path / "stops")
    config.optimizer.skip_nonfinite = True
    last = train.run(config, tmp_path / "w")
    assert np.isfinite(last["eval/mAP"])
    # One batch an epoch holds example 0: 8 steps of 16 over 32 examples skip 4 updates.
    skipped = [r["train/skipped"] for r in read_metrics(tmp_path / "w") if "train/skipped" in r]
    assert len(skipped) == TOTAL and skipped[-1] == 4
    assert skipped == sorted(skipped) and sorted(set(np.diff([0, *skipped]))) == [0, 1]
    step, state = final_state(tmp_path / "w")
    assert step == TOTAL and int(state["step"]) == TOTAL
    assert int(state[divergence.HEALTH]["skipped"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_guard_step_flags_and_skips_inside_jit():
    def step_fn(state, batch):
        params = {"w": state["params"]["w"] - batch["g"]}
        return dict(state, params=params, step=state["step"] + 1), {"loss": batch["loss"]}

    state = {
        "params": {"w": np.ones(3, np.float32)},
        "step": np.int32(0),
        divergence.HEALTH: divergence.initial_health(),
    }
    batches = [
        {"g": np.full(3, 0.5, np.float32), "loss": np.float32(1.0)},
        {"g": np.array([0, np.inf, 0], np.float32), "loss": np.float32(1.0)},  # bad update
        {"g": np.zeros(3, np.float32), "loss": np.float32(np.nan)},  # bad loss
    ]
    for skip in (False, True):
        step = jax.jit(divergence.guard_step(step_fn, skip))
        s = state
        for b in batches:
            s, m = step(s, b)
        health = jax.device_get(s[divergence.HEALTH])
        assert int(health["bad_step"]) == 2 and float(health["bad_loss"]) == 1.0
        assert int(s["step"]) == 3
        if skip:
            assert int(m["skipped"]) == int(health["skipped"]) == 2
            np.testing.assert_array_equal(s["params"]["w"], [0.5, 0.5, 0.5])
            assert divergence.check(s, True, None) == 2
        else:
            assert "skipped" not in m and int(health["skipped"]) == 0
            with pytest.raises(divergence.DivergenceError) as e:
                divergence.check(s, False, None)
            assert str(e.value).startswith(
                "step 2: the update is not finite (loss 1.0); no checkpoint yet; "
            )


@pytest.mark.parametrize("decay", [0.0, 0.9997])
def test_the_train_step_flags_a_nonfinite_update_under_a_finite_loss(decay, tmp_path):
    # The check reads the EMA's parameters (`train_step._ema_parameters`), with the EMA on or
    # off (decay 0): a NaN gradient under a finite loss is still caught, and skipped.
    config = tiny_config(tmp_path)
    config.ema.decay = decay
    config.optimizer.skip_nonfinite = True
    c, b = 5, 4
    training = bench_compile.synthetic_training(b, c)
    mod, graphdef, tx, state = train_state.init_train_state(config, c, 4, training)

    class NanGradient:  # the method, its loss finite and the loss's gradient NaN
        def __getattr__(self, name):
            return getattr(mod, name)

        @staticmethod
        def loss_fn(outputs, batch, config):
            loss, aux = mod.loss_fn(outputs, batch, config)
            logits = outputs["logits"]  # d sqrt(|x - x|) = 0 * inf at 0: NaN
            return loss + 0.0 * jnp.sqrt(jnp.abs(logits - logits)).sum(), aux

    batch = {
        "image": np.zeros((b, 32, 32, 3), np.float32),
        "labels": np.eye(b, c, dtype=np.float32),
        "index": np.arange(b, dtype=np.int32),
    }
    for module, bad in ((mod, False), (NanGradient(), True)):
        step = jax.jit(train_step.make_train_step(module, graphdef, tx, config, 4))
        new, metrics = step(jax.tree.map(np.asarray, state), batch)
        assert np.isfinite(float(metrics["loss"]))
        assert int(metrics["skipped"]) == int(bad)
        assert int(new[divergence.HEALTH]["bad_step"]) == (1 if bad else -1)
        moved = [
            np.any(x != y)
            for x, y in zip(
                jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"]), strict=True
            )
        ]
        assert any(moved) != bad  # a skipped update leaves every parameter as it was


def test_nonfinite_scores_say_the_model_diverged():
    scores = [np.zeros((2, 3)), np.array([[0.5, np.nan, 0.1], [0.2, 0.3, 0.4]])]
    divergence.check_scores(scores[:1], ["model"], "x")
    with pytest.raises(divergence.DivergenceError) as e:
        divergence.check_scores(scores, ["model", "EMA model"], "eval at step 4")
    assert str(e.value) == (
        "eval at step 4: 1 of 6 scores of the EMA model are not finite (e.g. nan): the model "
        "diverged; retrain from an earlier checkpoint with a lower config.optimizer.lr"
    )

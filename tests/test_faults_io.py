"""Storage faults real clusters have (issue 32): a full disk, a read-only workdir, a step
deleted while it is read, a bucket out of reach. Each is one line (exit 2 from the commands),
and nothing saved before it is lost.

A full disk is a small tmpfs and a read-only workdir a read-only bind mount, both mounted by
the test: they need root (or CAP_SYS_ADMIN) and are skipped, with the reason, where mounting
is not possible.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from test_reliability import CLI_FLAGS, assert_same_run, config_of
from train_helpers import REPO

from mlgraph import checkpointing, evaluate, paths, train
from mlgraph import workdir as workdirs
from mlgraph.errors import StorageError, WorkdirError
from mlgraph.metric_writer import RESUME, MetricWriter, read_metrics

PAGE = 4096  # tmpfs counts whole pages


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(proc.stderr.split()) or 'mount failed'})")


@contextlib.contextmanager
def small_disk(folder, size: int):
    """`folder` as a tmpfs of `size` bytes: a disk that fills up."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def read_only(source, folder):
    """`source` seen read-only at `folder` (a bind mount remounted read-only)."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(folder))
    try:
        _mount("-o", "remount,bind,ro", str(folder))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk) -> None:
    """Take every free page of `disk`."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * PAGE)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0


def pages(folder) -> int:
    """Bytes the files under `folder` take on a tmpfs."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def saved(workdir) -> dict:
    """What a run has saved: its checkpoint steps (and any other entry of checkpoints/), its
    config.json, its metrics."""
    return {
        "checkpoints": sorted(p.name for p in (workdir / "checkpoints").iterdir()),
        # `stop_at_step` may change between a run and its resumption.
        "config": {**json.loads((workdir / "config.json").read_text()), "stop_at_step": None},
        "metrics": read_metrics(workdir),
    }


def command(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository as a user runs it, with `env` added (8 CPU devices
    unless given, as the in-process runs)."""
    env = {"JAX_NUM_CPU_DEVICES": "8", **env}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def main_cli(workdir, data_dir) -> subprocess.CompletedProcess:
    """`python -m mlgraph.main` with `config_of`'s config."""
    config = ["--config", "configs/baseline_demo.py", f"--config.data.data_dir={data_dir}"]
    return command("-m", "mlgraph.main", "--workdir", str(workdir), *config, *CLI_FLAGS)


def run_of(data_dir, workdir, **changes):
    """`workdir` after a run of `config_of(data_dir, **changes)` in it."""
    train.run(config_of(data_dir, **changes), workdir)
    return workdir


@pytest.fixture(scope="module")
def trained(tiny_coco_dir, tmp_path_factory):
    """A finished run of `config_of`: the best checkpoint and the newest two are kept."""
    return run_of(tiny_coco_dir, tmp_path_factory.mktemp("trained") / "w")


# ---------------------------------------------------------------------------------------------
# Item 4: a full disk
# ---------------------------------------------------------------------------------------------
# slow: two short trainings in process and one on the command line.
@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(
    tiny_coco_dir, trained, tmp_path
):
    first = run_of(tiny_coco_dir, tmp_path / "first", stop_at_step=4)
    step4 = sum(p.stat().st_size for p in (first / "checkpoints" / "4").rglob("*") if p.is_file())
    # Room for the run's logs and lock, not for another checkpoint.
    with small_disk(tmp_path / "disk", pages(first) + 16 * PAGE) as disk:
        workdir = disk / "w"
        shutil.copytree(first, workdir)
        before = saved(workdir)
        assert before["checkpoints"] == ["2", "4"]

        proc = main_cli(workdir, tiny_coco_dir)
        assert proc.returncode == 2
        needed = paths.size_text(step4)
        assert re.fullmatch(
            re.escape(
                f"error: cannot write checkpoint step 6 in {workdir / 'checkpoints'}: no space "
                f"left on device (about {needed} needed, "
            )
            + r"\d+(\.\d)? (B|KiB) free"
            + re.escape("); free some space, then run the same command to resume from step 4"),
            proc.stderr.strip(),
        ), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        after = saved(workdir)
        # The saved steps, as they were (the partial step 6 is gone), the same config, and
        # the metrics up to the checkpoint (steps 5 and 6 are logged again on resume).
        assert after["checkpoints"] == ["2", "4"]
        assert after["config"] == before["config"]
        assert [r for r in after["metrics"] if r["step"] <= 4] == before["metrics"]
        assert not (workdir / "lock.json").exists()

        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert_same_run(run_of(tiny_coco_dir, workdir), trained)


def test_full_disk_at_metrics_and_tensorboard_is_one_line(tmp_path):
    with small_disk(tmp_path / "disk", 64 * PAGE) as disk:
        workdir = disk / "w"
        workdir.mkdir()
        logged = "".join(json.dumps({"step": s, "train/loss": 1 / s}) + "\n" for s in range(1, 7))
        (workdir / "metrics.jsonl").write_text(logged)
        writer = MetricWriter(workdir, resume_step=6)  # opens its event file
        fresh = disk / "fresh"
        fresh.mkdir()
        fill(disk)
        metrics = workdir / "metrics.jsonl"
        full = "no space left on device"

        # A line longer than the page the file ends in: written in part, then cut off again.
        scalars = {f"eval/AP_{i}": 0.5 for i in range(300)}
        needed = len(json.dumps({"step": 7, **scalars}) + "\n")
        with pytest.raises(StorageError) as e:
            writer.write(7, scalars)
        assert str(e.value) == (
            f"cannot write {metrics}: {full} (about {paths.size_text(needed)} needed, 0 B free)"
            f"; free some space, {RESUME}"
        )
        writer.close()
        assert metrics.read_text() == logged

        # Resumed on the full disk: metrics.jsonl cut back to step 4 (a new file replaces it).
        with pytest.raises(StorageError) as e:
            MetricWriter(workdir, resume_step=4)
        assert (
            str(e.value) == f"cannot write {metrics}: {full} (0 B free); free some space, {RESUME}"
        )
        assert metrics.read_text() == logged
        assert sorted(p.name for p in workdir.iterdir()) == ["metrics.jsonl", "tensorboard"]

        # A new run on the full disk: TensorBoard's event file is its first write.
        with pytest.raises(StorageError) as e:
            MetricWriter(fresh, resume_step=0)
        assert str(e.value) == (
            f"cannot write {fresh / 'tensorboard'}: {full} (0 B free); free some space, {RESUME}"
        )
        assert metrics.read_text() == logged


def test_full_disk_at_eval_json_is_one_line(tmp_path, capsys):
    with small_disk(tmp_path / "disk", 16 * PAGE) as disk:
        fill(disk)
        out = disk / "eval_step8.json"
        text = json.dumps({"step": 8, "model": {"mAP": 50.0}}, indent=2)
        with pytest.raises(SystemExit) as e:
            evaluate._write_results(paths.path(out), text)
        assert e.value.code == 2
        assert capsys.readouterr().err == (
            f"error: cannot write {out}: no space left on device (about "
            f"{paths.size_text(len(text))} needed, 0 B free); free some space, or write the "
            "results elsewhere with --output FILE\n"
        )
        assert not out.exists()


def test_a_failed_checkpoint_read_prints_only_the_warning(
    trained, tmp_path, monkeypatch, capsys, caplog
):
    """The echoes of the reads Orbax abandons (TensorStore's calls into the event loop Orbax
    has closed, asyncio's errors no one retrieved) can come before the failure is raised:
    none reaches the terminal, and other reports still do."""
    import asyncio
    import logging

    import tensorstore as ts

    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    ckpts = checkpointing.TrainCheckpoints(workdir / "checkpoints")
    order = workdirs.step_order(ckpts, None)
    ckpts.close()
    reports = []  # what reaches the terminal's unraisable hook
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    real = checkpointing.TrainCheckpoints.read

    async def wait(future):
        return await future

    def read_abandoning(self, step, *args, **kwargs):
        if step != order[0]:
            return real(self, step, *args, **kwargs)
        promise, future = ts.Promise.new()  # an array read left pending in a loop that closes
        loop = asyncio.new_event_loop()
        task = loop.create_task(wait(future))
        task._log_destroy_pending = False  # the test's own task: no report when collected
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        promise.set_result(1)  # TensorStore calls into the closed loop: an unraisable report
        sibling = ValueError("RESOURCE_EXHAUSTED: Error reading a sibling array")
        logging.getLogger("asyncio").error("Future exception was never retrieved", exc_info=sibling)
        raise ValueError("OUT_OF_RANGE: Error reading the array: truncated")

    monkeypatch.setattr(checkpointing.TrainCheckpoints, "read", read_abandoning)
    _, step = workdirs.read_state(workdir)
    assert step == order[1]
    assert capsys.readouterr().err == (
        f"warning: checkpoint step {order[0]} in {workdir / 'checkpoints'} cannot be read "
        f"(OUT_OF_RANGE: Error reading the array: truncated); using step {order[1]} instead "
        f"(saved steps: {', '.join(map(str, sorted(order)))})\n"
    )
    assert reports == [] and caplog.records == []

    class Other:  # any other report passes through
        def __del__(self):
            raise KeyError("other")

    Other()
    logging.getLogger("asyncio").error("other", exc_info=KeyError("other"))
    assert [type(r.exc_value) for r in reports] == [KeyError]
    assert [r.getMessage() for r in caplog.records] == ["other"]


# ---------------------------------------------------------------------------------------------
# Item 7: a read-only workdir
# ---------------------------------------------------------------------------------------------
def test_read_only_workdir_evaluates_then_one_line_and_resume_is_one_line(
    tiny_coco_dir, trained, tmp_path
):
    with read_only(trained, tmp_path / "ro") as workdir:
        before = saved(workdir)
        ckpts = checkpointing.TrainCheckpoints(workdir / "checkpoints")
        step = ckpts.pick_step()
        ckpts.close()
        proc = command("-m", "mlgraph.evaluate", "--workdir", str(workdir))
        assert proc.returncode == 2
        table = proc.stdout.splitlines()
        assert table[0] == "val split, 13 images"
        assert [row.split()[0] for row in table[1:]] == ["model", "model", "ema"]
        assert proc.stderr.strip() == (
            f"error: cannot write {workdir / f'eval_step{step}.json'}: read-only file system; "
            "make it writable, or write the results elsewhere with --output FILE"
        )

        proc = main_cli(workdir, tiny_coco_dir)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            f"error: cannot write {workdir / 'lock.json'}: read-only file system; make it "
            "writable, or copy the workdir to a writable disk and pass the copy as --workdir"
        )
        assert saved(workdir) == before


# ---------------------------------------------------------------------------------------------
# Item 9: a step deleted while it is read
# ---------------------------------------------------------------------------------------------
def test_a_step_deleted_while_read_is_picked_again(trained, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    real = checkpointing.TrainCheckpoints.read
    deleted = []

    def read_after_cleanup(self, step, *args, **kwargs):
        if not deleted:  # another run's keep_checkpoints cleanup, between listing and reading
            shutil.rmtree(self.directory / str(step))
            deleted.append(step)
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing.TrainCheckpoints, "read", read_after_cleanup)
    state, step = workdirs.read_state(workdir)
    ckpts = checkpointing.TrainCheckpoints(workdir / "checkpoints")
    expected = ckpts.pick_step()  # the policy's step among those left
    ckpts.close()
    assert step == expected and deleted and deleted[0] != expected
    assert int(state["step"]) == expected
    assert capsys.readouterr().err == ""  # a race, not a damaged checkpoint
    assert (workdir / "checkpoints" / str(expected)).is_dir()


def test_steps_deleted_under_every_read_is_one_line(trained, monkeypatch):
    def gone(self, step, *args, **kwargs):
        raise FileNotFoundError(f"Checkpoint at {self.directory / str(step)} not found.")

    monkeypatch.setattr(checkpointing.TrainCheckpoints, "read", gone)
    monkeypatch.setattr(workdirs, "_deleted", lambda folder: True)
    before = saved(trained)
    with pytest.raises(WorkdirError) as e:
        workdirs.read_state(trained)
    assert str(e.value) == (
        f"{trained / 'checkpoints'}: the saved steps were deleted while being read, "
        f"{workdirs.RACE_TRIES} times (a run saving there keeps only its newest steps); try "
        "again, or stop that run"
    )
    assert saved(trained) == before  # reading moves nothing


# ---------------------------------------------------------------------------------------------
# Item 11: a gs:// workdir out of reach
# ---------------------------------------------------------------------------------------------
# gcsfs without credential lookups or its bucket-layout probe (the emulator tests' settings).
CLOUD_ENV = {"FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
CREDENTIALS = (
    "gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json; "
    "README: Cloud Storage"
)
DNS = "Cannot connect to host storage.googleapis.com:443 ssl:default [Name or service not known]"


def dns_error():
    """What aiohttp raises where the storage service's name does not resolve (no network);
    `NO_NETWORK` raises the same."""
    import socket

    from aiohttp.client_exceptions import ClientConnectorDNSError
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey(*[None] * len(ConnectionKey._fields))
    key = key._replace(host="storage.googleapis.com", port=443, is_ssl=True, ssl=True)
    return ClientConnectorDNSError(key, socket.gaierror(-2, "Name or service not known"))


def refresh_error():
    from google.auth.exceptions import RefreshError

    return RefreshError("Reauthentication is needed.")


def forbidden():
    from gcsfs.retry import HttpError

    return HttpError({"code": 403, "message": "anonymous caller does not have access"})


@pytest.mark.parametrize(
    "error, cause",
    [
        (dns_error, f"cannot reach the storage service ({DNS}); check the network and the "),
        (refresh_error, "not authorised (Reauthentication is needed.); check the "),
        (forbidden, "not authorised (anonymous caller does not have access, 403); check the "),
    ],
)
def test_unreachable_bucket_is_one_line(error, cause, monkeypatch):
    pytest.importorskip("gcsfs")
    import fsspec
    from gcsfs.core import GCSFileSystem

    # CLOUD_ENV in process (gcsfs and fsspec read it when they were imported).
    registry = sys.modules["fsspec.registry"]._registry  # the module's name is a mapping
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(fsspec.config.conf, protocol, {"token": "anon"})
        monkeypatch.setitem(registry, protocol, GCSFileSystem)

    async def request(self, *args, **kwargs):
        raise error()

    monkeypatch.setattr(GCSFileSystem, "_request", request)
    GCSFileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageError) as e:
            workdirs.create("gs://some-bucket/run")
        assert str(e.value) == (
            f"cannot create --workdir gs://some-bucket/run: {cause}credentials ({CREDENTIALS})"
        )
        with pytest.raises(StorageError) as e:  # a command that reads the run: the same
            workdirs.read_config("gs://some-bucket/run")
        assert str(e.value).startswith(f"cannot read --workdir gs://some-bucket/run: {cause}")
    finally:
        GCSFileSystem.clear_instance_cache()


# The command line with aiohttp's requests failing as they do without a network: gcsfs retries
# (its back-off made instant) and logs each failure before raising it.
NO_NETWORK = """
import asyncio, runpy, socket, sys
import aiohttp
from aiohttp.client_exceptions import ClientConnectorDNSError
from aiohttp.client_reqrep import ConnectionKey

async def no_dns(self, *args, **kwargs):
    key = ConnectionKey(*[None] * len(ConnectionKey._fields))
    key = key._replace(host="storage.googleapis.com", port=443, is_ssl=True, ssl=True)
    raise ClientConnectorDNSError(key, socket.gaierror(-2, "Name or service not known"))

aiohttp.ClientSession._request = no_dns
sleep = asyncio.sleep
async def at_once(delay, result=None):
    return await sleep(0, result)
asyncio.sleep = at_once
sys.argv[0] = "mlgraph.main"
runpy.run_module("mlgraph.main", run_name="__main__", alter_sys=True)
"""


def test_cli_unreachable_bucket_is_one_line_exit_2(tmp_path):
    pytest.importorskip("gcsfs")
    args = ["--config", "configs/baseline_demo.py", "--workdir", "gs://some-bucket/run"]
    proc = command("-c", NO_NETWORK, *args, **CLOUD_ENV, JAX_NUM_CPU_DEVICES="1")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: cannot create --workdir gs://some-bucket/run: cannot reach the storage service "
        f"({DNS}); check the network and the credentials ({CREDENTIALS})\n"
    )
    assert proc.stdout == ""

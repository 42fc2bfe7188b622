"""Workdirs on Cloud Storage (gs://), against a local GCS emulator on 127.0.0.1.

The emulator (gcp-storage-emulator, in-process) stands in for GCS; gcsfs (through etils.epath)
finds it by STORAGE_EMULATOR_HOST, TensorStore (Orbax's checkpoints) by TENSORSTORE_GCS_HTTP_URL
with the test token GOOGLE_AUTH_TOKEN_FOR_TESTING instead of real credentials.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import REPO, final_state, tiny_config

from mlgraph import evaluate, paths, train
from mlgraph import workdir as workdirs
from mlgraph.errors import StorageError, WorkdirError
from mlgraph.metric_writer import read_metrics

if importlib.util.find_spec("gcsfs") is None:  # imported by the fixture, after its settings
    pytest.skip("gcsfs is not installed (pip install 'mlgraph[gcs]')", allow_module_level=True)
emulator_server = pytest.importorskip("gcp_storage_emulator.server")

BUCKET = "test-bucket"
TOTAL = 6  # steps; evaluated at 3 and 6, checkpointed every 2


def emulator_env(url: str) -> dict[str, str]:
    """The variables that point gcsfs and TensorStore at the emulator at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (read when fsspec loads)
        # gcsfs's zonal-bucket probe asks a gRPC API the emulator lacks (60 s timeout each).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _with_generation(handler):
    """`handler` that also sends the object's generation as `x-goog-generation`, as GCS does
    on every object read. TensorStore's gcs driver reads it (its absence is "Malformed
    StorageGeneration"); gcp-storage-emulator does not send it."""

    def handle(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except Exception:  # no such object: the handler answers 404 itself
            pass
        return handler(request, response, storage, *args, **kwargs)

    return handle


def _object_reads_with_generation(routes):
    """The emulator's routes with each object GET wrapped by `_with_generation`."""
    return tuple(
        (
            regex,
            {
                m: _with_generation(h) if m == "GET" and "object_id" in regex else h
                for m, h in methods.items()
            },
        )
        for regex, methods in routes
    )


@pytest.fixture(scope="module")
def gcs():
    """A fresh in-memory GCS emulator on 127.0.0.1 holding the bucket `test-bucket`, with
    gcsfs and TensorStore pointed at it; yields its URL."""
    import fsspec
    import portpicker

    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        routes = _object_reads_with_generation(emulator_server.HANDLERS)
        mp.setattr(emulator_server, "HANDLERS", routes)  # looked up on every request
        server = emulator_server.create_server(
            "127.0.0.1", port, in_memory=True, default_bucket=BUCKET
        )
        server.start()
        for k, v in emulator_env(url).items():
            mp.setenv(k, v)  # subprocesses (the two-process run) inherit them
        for protocol in ("gs", "gcs"):  # fsspec read its environment when it was imported
            mp.setitem(fsspec.config.conf, protocol, {"token": "anon"})
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # none made for another endpoint
        try:
            yield url
        finally:
            gcsfs.GCSFileSystem.clear_instance_cache()
            server.stop()


def config_of(data_dir, **changes):
    c = tiny_config(data_dir, total_steps=TOTAL)
    c.checkpoint_every_steps = 2
    c.update(changes)
    return c


def test_paths_local_unchanged_cloud_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.path("a/b")) == os.fspath(tmp_path / "a" / "b")
    assert os.fspath(paths.path("gs://b/x")) == "gs://b/x"
    assert paths.scheme("gs://b/x") == "gs" and paths.scheme("/a/b") is None
    assert not paths.is_cloud("C:/x") and not paths.is_cloud("./gs:/b")


def test_cloud_workdir_without_the_extra_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a)
    )
    with pytest.raises(StorageError) as e:
        workdirs.create("gs://bucket/run")
    assert str(e.value) == (
        "--workdir gs://bucket/run: gs:// paths need the gcsfs backend; install it with "
        "pip install 'mlgraph[gcs]'"
    )


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_cli_cloud_workdir_without_backend_exits_2(tmp_path):
    """As a user meets it: one line on stderr, status 2, and no local './s3:' folder."""
    cmd = [sys.executable, "-m", "mlgraph.main", "--config", str(REPO / "configs/baseline_demo.py")]
    # One device: baseline_demo's eval batch of 100 is checked first and divides by 1, not 8.
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_NUM_CPU_DEVICES="1")
    proc = subprocess.run(
        [*cmd, "--workdir", "s3://bucket/run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --workdir s3://bucket/run: s3:// paths need the s3fs backend; install it with "
        "pip install 'mlgraph[s3]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_append_and_lock_primitives_on_gcs(gcs):
    p = paths.path(f"gs://{BUCKET}/prims/log.txt")
    paths.append_text(p, "a\n")
    paths.append_text(p, "b\n")
    assert p.read_text() == "a\nb\n"
    lock = paths.path(f"gs://{BUCKET}/prims/lock.json")
    assert paths.create_new(lock, "{}") and not paths.create_new(lock, "{}")
    before = paths.mtime(lock)
    paths.touch(lock)
    assert paths.mtime(lock) >= before and lock.read_text() == "{}"
    # A checkpoint step set aside (`TrainCheckpoints._set_aside`): a folder moved.
    step = paths.path(f"gs://{BUCKET}/prims/checkpoints/7")
    (step / "state").mkdir(parents=True, exist_ok=True)
    (step / "state" / "a").write_text("a")
    (step / "b").write_text("b")
    target = paths.path(f"gs://{BUCKET}/prims/unreadable_checkpoints/7")
    paths.move(step, target)
    assert not step.exists()
    assert (target / "state" / "a").read_text() == "a" and (target / "b").read_text() == "b"


def test_workdir_in_a_missing_bucket_is_one_line(gcs):
    with pytest.raises(WorkdirError) as e:
        workdirs.create("gs://no-such-bucket/run")
    assert str(e.value) == (
        "--workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist (or these "
        "credentials cannot see it); create it with gcloud storage buckets create "
        "gs://no-such-bucket"
    )
    assert not paths.path("gs://no-such-bucket").exists()  # and it was not created


# slow: three short trainings, two of them checkpointing through the emulator's HTTP server.
@pytest.mark.slow
def test_train_on_gcs_resumes_bit_identical_to_a_local_run(gcs, tiny_coco_dir, tmp_path):
    local = tmp_path / "local"
    train.run(config_of(tiny_coco_dir), local)

    workdir = f"gs://{BUCKET}/run"
    train.run(config_of(tiny_coco_dir, stop_at_step=3), workdir)
    cloud = paths.path(workdir)
    assert final_state(cloud)[0] == 3
    assert not (cloud / "lock.json").exists()
    # The second run resumes from the bucket's step 3 and finishes.
    train.run(config_of(tiny_coco_dir), workdir)

    names = {p.name for p in cloud.iterdir()}
    assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints"} <= names
    assert "lock.json" not in names
    events = [p for p in (cloud / "tensorboard").iterdir() if p.name.startswith("events.out")]
    assert len(events) == 2 and all(p.stat().length > 0 for p in events)  # one per run
    steps = sorted(int(p.name) for p in (cloud / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == TOTAL

    step_a, state_a = final_state(cloud)
    step_b, state_b = final_state(local)
    assert step_a == step_b == TOTAL
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    assert read_metrics(workdir) == read_metrics(local)
    # `mlgraph.evaluate --workdir gs://...` scores the bucket's best checkpoint as the local one.
    np.testing.assert_equal(evaluate.evaluate_workdir(workdir), evaluate.evaluate_workdir(local))
    assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()


@pytest.mark.slow
@pytest.mark.multiprocess  # run alone: see tests/test_multihost.py
def test_two_processes_write_one_workdir_on_gcs(gcs, tiny_coco_dir):
    """The multi-host run of test_multihost (2 processes x 2 CPU devices, gloo) with its
    workdir in the emulator's bucket: every process reaches it through the same gs:// path."""
    from test_multihost import finish, start_workers

    workdir = f"gs://{BUCKET}/multi"
    outs = finish(start_workers(tiny_coco_dir, workdir, 4))
    assert "on 4 device(s)" in outs[0]
    cloud = paths.path(workdir)
    assert final_state(cloud)[0] == 4
    losses = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # process 0 logs each step once
    assert not (cloud / "lock.json").exists()
    # Each process wrote its own shard of the checkpoint into the bucket.
    state_dir = cloud / "checkpoints" / "4" / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in state_dir.iterdir()}


def test_gcs_data_dir_says_what_works():
    """array_record reads local files only: a gs:// data dir is one line naming the way out."""
    from mlgraph.data import datasets

    c = tiny_config(f"gs://{BUCKET}/data")
    with pytest.raises(StorageError, match=r"^config.data.data_dir=gs://test-bucket/data: "):
        datasets.open_dataset(c.data)
    with pytest.raises(StorageError, match="Cloud Storage FUSE"):
        datasets.open_dataset(c.data)


def test_weights_predictions_figures_and_label_files_on_gcs(gcs):
    """The other files mlgraph writes or reads by path: converted weights (`convert --output`,
    `init_from`), predictions (`predict --output`), figures (`viz`), label files
    (`embed_path`/`graph_path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlgraph import checkpointing, predict
    from mlgraph.labels import arrays

    weights = f"gs://{BUCKET}/weights/tiny"
    tree = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    checkpointing.save_weights(weights, tree, {"name": "tiny"})
    got, settings = checkpointing.load_weights(weights)
    np.testing.assert_array_equal(got["dense"]["kernel"], tree["dense"]["kernel"])
    assert settings == {"name": "tiny"}
    with pytest.raises(FileExistsError):  # never overwritten, in a bucket as on disk
        checkpointing.save_weights(weights, tree)

    records = [{"file": "a.jpg", "labels": ["cat"], "scores": {"cat": 0.9, "dog": 0.1}}]
    out = paths.path(f"gs://{BUCKET}/preds/p.csv")
    predict.write_records(records, out, ["cat", "dog"])
    assert out.read_text().splitlines() == ["file,labels,cat,dog", "a.jpg,cat,0.900000,0.100000"]

    fig = plt.figure(figsize=(1, 1))
    png = paths.path(f"gs://{BUCKET}/viz/f.png")
    paths.save_figure(fig, png, dpi=10)
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    vectors = paths.path(f"gs://{BUCKET}/labels/e.npy")
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.eye(3, dtype=np.float32))
    vectors.write_bytes(buffer.getvalue())
    kind, table = arrays.read_label_file(os.fspath(vectors), "config.model.embed_path")
    assert kind == arrays.MATRIX
    np.testing.assert_array_equal(table, np.eye(3))

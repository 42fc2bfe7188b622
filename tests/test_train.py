"""The training loop: it learns, resumes exactly, and is the same on 8 devices as on 1."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import REPO, final_state, tiny_config

from mlgraph import checkpointing, evaluation, recipes, train, train_state, train_step
from mlgraph.data import datasets, demo
from mlgraph.metric_writer import read_metrics


@pytest.fixture(scope="module")
def data_dir(tiny_coco_dir):
    return tiny_coco_dir


def test_resume_is_exact(data_dir, tmp_path):
    config = tiny_config(data_dir, total_steps=6)
    train.run(config, tmp_path / "once")

    config.stop_at_step = 3
    train.run(config, tmp_path / "twice")
    assert checkpointing.TrainCheckpoints(tmp_path / "twice" / "checkpoints").latest_step() == 3
    config.stop_at_step = 0
    train.run(config, tmp_path / "twice")

    step_a, a = final_state(tmp_path / "once")
    step_b, b = final_state(tmp_path / "twice")
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bit for bit
    ev_a = [r for r in read_metrics(tmp_path / "once") if "eval/mAP" in r]
    ev_b = [r for r in read_metrics(tmp_path / "twice") if "eval/mAP" in r]
    assert ev_a[-1] == ev_b[-1]
    loss_a = {
        r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "once") if "train/loss" in r
    }
    loss_b = {
        r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "twice") if "train/loss" in r
    }
    assert loss_a == loss_b


def test_finished_run_does_not_retrain(data_dir, tmp_path, capsys):
    config = tiny_config(data_dir, total_steps=3)
    first = train.run(config, tmp_path / "wd")
    mtime = (tmp_path / "wd" / "metrics.jsonl").stat().st_mtime_ns
    again = train.run(config, tmp_path / "wd")
    assert "training already finished at step 3/3" in capsys.readouterr().out
    assert again == first
    assert (tmp_path / "wd" / "metrics.jsonl").stat().st_mtime_ns == mtime


def run_cli(workdir, data_dir, devices, *extra):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
    cmd = [
        sys.executable,
        "-m",
        "mlgraph.main",
        "--config",
        str(REPO / "configs/baseline_demo.py"),
        "--workdir",
        str(workdir),
        "--config.data.name=coco2014",
        f"--config.data.data_dir={data_dir}",
        "--config.image_size=32",
        "--config.batch_size=16",
        "--config.eval_batch_size=16",
        "--config.total_steps=5",
        "--config.eval_every_steps=5",
        "--config.log_every_steps=1",
        "--config.model.backbone_kwargs.widths=(8, 16)",
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_eight_devices_equal_one(data_dir, tmp_path):
    losses = {}
    for devices in (1, 8):
        proc = run_cli(tmp_path / f"d{devices}", data_dir, devices)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"on {devices} device(s)" in proc.stdout
        losses[devices] = [
            r["train/loss"] for r in read_metrics(tmp_path / f"d{devices}") if "train/loss" in r
        ]
    assert len(losses[1]) == 5
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-4)
    assert losses[1][0] != losses[1][-1]  # it did train


# slow: 300 steps; the loop's numbers are in CI through test_resume_is_exact and
# test_eight_devices_equal_one
@pytest.mark.slow
def test_digits_mosaic_learns(tmp_path):
    raw = demo.write_digits_mosaic(tmp_path / "raw", num_train=1200, num_test=400, seed=0)
    datasets.build("coco2014", raw, tmp_path / "built")
    config = tiny_config(tmp_path / "built", total_steps=300)
    config.batch_size = 32
    config.eval_batch_size = 200
    config.eval_every_steps = 300
    config.log_every_steps = 100
    config.optimizer.lr = 3e-3
    config.ema.decay = 0.9
    config.model.backbone_kwargs.widths = (16, 32, 64)

    # Chance level first: the untrained model, 0 steps.
    config.total_steps = 1
    config.optimizer.lr = 1e-12
    start = train.run(config, tmp_path / "chance")["eval/mAP"]
    config.total_steps = 300
    config.optimizer.lr = 3e-3
    end = train.run(config, tmp_path / "learn")
    assert start < 60
    assert end["eval/mAP"] >= 90, end
    lines = (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 300

    # `mlgraph.predict` on the test images' files: each image's known labels are its top ones.
    from mlgraph import predict

    annotations = json.loads((raw / "annotations" / "instances_val2014.json").read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    known = {im["id"]: set() for im in annotations["images"]}
    for a in annotations["annotations"]:
        known[a["image_id"]].add(names[a["category_id"]])
    files = {im["id"]: raw / "val2014" / im["file_name"] for im in annotations["images"]}
    ids = sorted(known)[:40]
    records = predict.Predictor.from_workdir(tmp_path / "learn").predict(
        [files[i] for i in ids], top_k=len(names)
    )
    hits = [
        {n for n, _ in r["top"][: len(known[i])]} == known[i]
        for i, r in zip(ids, records, strict=True)
    ]
    assert sum(hits) >= 0.8 * len(ids), hits


def test_evaluate_restores_same_metrics(data_dir, tmp_path):
    from mlgraph import evaluate

    config = tiny_config(data_dir, total_steps=3)
    last = train.run(config, tmp_path / "wd")
    result = evaluate.evaluate_workdir(tmp_path / "wd")
    assert result["step"] == 3
    for name, value in result["model"].items():
        assert value == pytest.approx(last[f"eval/{name}"], abs=1e-9), name
    for name, value in result["ema"].items():
        assert value == pytest.approx(last[f"eval/ema_{name}"], abs=1e-9), name
    table = evaluation.format_table({"model": result["model"], "ema": result["ema"]})
    assert table.splitlines()[0].split()[:4] == ["model", "mAP", "mAP_ni", "CP"]
    assert f"{result['ema']['mAP']:7.2f}".strip() in table.splitlines()[2]


def test_ema_update_averages_or_copies_live():
    import jax.numpy as jnp

    from mlgraph.models import salgl

    ema = {"params": {"w": jnp.zeros(2)}, "rest": {"comatrix": {"value": jnp.zeros(3)}}}
    live = {"params": {"w": jnp.ones(2)}, "rest": {"comatrix": {"value": jnp.full(3, 5.0)}}}
    config = tiny_config("/unused")
    config.model = recipes.model_config("salgl", comat_ema=True)
    averaged = train_step.ema_update(ema, live, 0.9, salgl.ema_live_paths(config))
    np.testing.assert_allclose(averaged["rest"]["comatrix"]["value"], 0.5)
    np.testing.assert_allclose(averaged["params"]["w"], 0.1, rtol=1e-6)
    config.model = recipes.model_config("salgl", comat_ema=False)
    copied = train_step.ema_update(ema, live, 0.9, salgl.ema_live_paths(config))
    np.testing.assert_allclose(copied["rest"]["comatrix"]["value"], 5.0)
    np.testing.assert_allclose(copied["params"]["w"], 0.1, rtol=1e-6)


def test_evaluate_converted_checkpoint(data_dir, tmp_path):
    """`evaluate --checkpoint` scores a weights checkpoint (as `mlgraph.convert` writes) exactly
    as the model it holds scores the evaluation images."""
    from flax import nnx

    from mlgraph import evaluate, metrics
    from mlgraph.data import pipeline

    config = tiny_config(data_dir)
    dataset = datasets.open_dataset(config.data)
    _, graphdef, params, rest = train_state.create_model(config, dataset.num_classes)
    # Distinct weights from a fresh init, so that loading them is what is measured.
    params = jax.tree.map(lambda x: x + 0.05 * np.sign(np.asarray(x) + 0.01), params)
    model = nnx.merge(graphdef, params, rest)
    checkpointing.save_weights(
        tmp_path / "w", nnx.to_pure_dict(nnx.state(model)), {"kind": "model"}
    )
    result = evaluate.evaluate_checkpoint(str(tmp_path / "w"), config)

    source = dataset.sources[config.data.eval_split]
    batches = list(pipeline.eval_batches(source, config, dataset.num_classes))
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    scores = jax.nn.sigmoid(model(images, train=False)["logits"])
    want = metrics.compute_all(np.asarray(scores), labels > 0.5)
    for name, value in want.items():
        assert result["model"][name] == pytest.approx(value, abs=1e-4), name


def test_evaluate_checkpoint_refuses_backbone(tmp_path, data_dir):
    from mlgraph import evaluate
    from mlgraph.errors import ConfigError

    checkpointing.save_weights(tmp_path / "b", {"x": np.zeros(2)}, {"kind": "backbone"})
    with pytest.raises(ConfigError, match=r"holds a backbone \('kind' in settings.json\), not a "):
        evaluate.evaluate_checkpoint(str(tmp_path / "b"), tiny_config(data_dir))

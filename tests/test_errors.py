"""Bad input gets one clear line naming the thing, and nothing in the workdir is lost."""

import os
import subprocess
import sys

import pytest
from train_helpers import REPO, tiny_config

from mlgraph import train
from mlgraph.errors import DataError, WorkdirError


def main_cli(*args):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    cmd = [sys.executable, "-m", "mlgraph.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_misspelt_override(tmp_path):
    proc = main_cli(
        "--config",
        "configs/baseline_demo.py",
        "--workdir",
        str(tmp_path / "w"),
        "--config.batchsize=3",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --config.batchsize=3: no config field 'batchsize' (did you mean \"batch_size\"?)"
    )
    assert not (tmp_path / "w").exists()


def test_missing_config_file(tmp_path):
    proc = main_cli("--config", "configs/nothere.py", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --config configs/nothere.py: cannot load the config (no such file)"
    )


def test_missing_workdir_parent(tmp_path):
    proc = main_cli("--config", "configs/baseline_demo.py", "--workdir", str(tmp_path / "no" / "w"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: --workdir {tmp_path / 'no' / 'w'}: parent folder {tmp_path / 'no'} does not exist"
    )


def test_dataset_not_built(tmp_path):
    config = tiny_config(tmp_path / "empty")
    with pytest.raises(DataError) as e:
        train.run(config, tmp_path / "w")
    built = tmp_path / "empty" / "coco2014" / "nonempty" / "1.0.0"
    assert str(e.value) == (
        f"data set 'coco2014' is not built: looked in {built}; build it once with: "
        f"python -m mlgraph.data.build coco2014 --manual_dir RAW --data_dir {tmp_path / 'empty'}"
    )


def test_other_config_in_workdir_keeps_files(tmp_path, tiny_coco_dir):
    config = tiny_config(tiny_coco_dir, total_steps=2)
    config.eval_every_steps = 2
    train.run(config, tmp_path / "w")
    before = {p: p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file()}
    config.optimizer.lr = 0.5
    config.image_size = 48
    with pytest.raises(WorkdirError) as e:
        train.run(config, tmp_path / "w")
    assert str(e.value) == (
        f"--workdir {tmp_path / 'w'}: holds a run of a different config (fields image_size, "
        "optimizer.lr differ); use a new workdir"
    )
    after = {p: p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file()}
    assert after == before

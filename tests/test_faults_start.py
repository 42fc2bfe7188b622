"""Faults at the start of a run (issue 32, items 5, 6 and 8): a run that fails to start leaves
its workdir as it was, config.json is written only once the run has a checkpoint, a lost
config.json is recovered from the copy kept with each checkpoint, values no user means are
refused in one line naming the field and its range, and an unknown config field names the
config file, the level and that level's fields."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from train_helpers import REPO, tiny_config

from mlgraph import checkpointing, train
from mlgraph import workdir as workdirs
from mlgraph.errors import ConfigError, DataError, WorkdirError
from mlgraph.models import layers

STEPS = 2


def config_of(data_dir, **changes):
    """The tiny run (2 steps, evaluated and checkpointed at step 2) with `changes` (dotted
    field names written with '__')."""
    c = tiny_config(data_dir, total_steps=STEPS)
    c.eval_every_steps = STEPS
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in changes.items()})
    return c


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m mlgraph.<module> ARGS` as a user runs it."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
    cmd = [sys.executable, "-m", f"mlgraph.{module}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def start_refused(workdir, override: str) -> list[str]:
    """The `error:`/`warning:` lines of `python -m mlgraph.main` on `workdir` with `override`,
    after checking that it exits 2 and leaves every file of the workdir as it was."""
    before = snapshot(workdir)
    args = ("--config", "configs/baseline_demo.py", "--workdir", str(workdir), override)
    proc = cli("main", *args)
    assert proc.returncode == 2
    assert snapshot(workdir) == before
    return errors_of(proc.stderr)


def errors_of(stderr: str) -> list[str]:
    """The `error:` and `warning:` lines of a command's stderr (XLA's start-up lines aside)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "warning:"))]


def snapshot(workdir) -> dict[str, bytes]:
    """Every file under `workdir` (relative path -> bytes), to compare before and after."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tiny_coco_dir, tmp_path_factory):
    """(a finished tiny run's workdir, the stderr of its training). Its workdir held a stale
    config.json of another config and no checkpoints, as a failed start of an earlier mlgraph
    left it: the run warns, trains, and replaces it at its first checkpoint."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    workdir.mkdir()
    stale = workdirs.config_record(train.check_config(config_of(tiny_coco_dir, batch_size=8)))
    (workdir / "config.json").write_text(json.dumps(stale))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train.run(config_of(tiny_coco_dir), workdir)
    return workdir, err.getvalue()


def copy_of(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained[0], workdir)
    return workdir


# ---------------------------------------------------------------------------------------------
# Item 5: config.json only once the run has started; never over another config's checkpoints
# ---------------------------------------------------------------------------------------------
def test_a_failed_start_changes_nothing_and_a_lost_config_json_still_guards_the_run(
    trained, tiny_coco_dir, tmp_path, capsys
):
    # The stale config.json of a start that never checkpointed was a warning, then replaced.
    assert errors_of(trained[1]) == [
        f"warning: --workdir {trained[0]}: its config.json is of another config (fields "
        "batch_size differ) but has no checkpoints; this run's config replaces it at its first "
        "checkpoint"
    ]
    workdir = copy_of(trained, tmp_path)
    config_json = (workdir / "config.json").read_bytes()
    recorded = workdirs.config_record(train.check_config(config_of(tiny_coco_dir)))
    assert json.loads(config_json) == recorded
    # Each checkpoint keeps a copy of the config.
    assert checkpointing.saved_config(workdir / "checkpoints", STEPS) == recorded
    before = snapshot(workdir)
    assert {"config.json", "metrics.jsonl"} <= set(before)

    # A start that fails its checks: one line, exit 2, the workdir byte for byte as it was.
    assert start_refused(workdir, "--config.batch_size=-8") == [
        "error: config.batch_size=-8: out of range; expected > 0"
    ]
    with pytest.raises(ConfigError) as e:
        train.run(config_of(tiny_coco_dir, model__name="nonexistent"), workdir)
    assert str(e.value) == (
        "config.model.name='nonexistent': no module mlgraph/models/nonexistent.py"
    )
    assert snapshot(workdir) == before

    # config.json lost: the checkpoints' copy refuses another batch size, and writes nothing.
    (workdir / "config.json").unlink()
    before = snapshot(workdir)
    with pytest.raises(WorkdirError) as e:
        train.run(config_of(tiny_coco_dir, batch_size=8), workdir)
    assert str(e.value) == (
        f"--workdir {workdir}: holds a run of a different config (fields batch_size differ; "
        f"no config.json, compared with checkpoint step {STEPS}); use a new workdir"
    )
    assert snapshot(workdir) == before
    # Evaluation reads the checkpoints' copy (one warning line) ...
    capsys.readouterr()
    assert json.loads(workdirs.read_config(workdir).to_json_best_effort()) == recorded
    assert errors_of(capsys.readouterr().err) == [
        f"warning: --workdir {workdir}: no config.json; using the config kept with checkpoint "
        f"step {STEPS} (resuming the run writes config.json again)"
    ]
    # ... and the run's own config resumes (finished: nothing to do) and writes it again.
    train.run(config_of(tiny_coco_dir), workdir)
    assert (workdir / "config.json").read_bytes() == config_json
    assert snapshot(workdir) == {**before, "config.json": config_json}


def test_checkpoints_without_a_config_copy_or_config_json_are_refused(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    (workdir / "config.json").unlink()
    for step in checkpointing.step_folders(workdir / "checkpoints"):
        meta = workdir / "checkpoints" / str(step) / checkpointing.STEP_METADATA_FILE
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"custom_metadata": {}}))
    before = snapshot(workdir)
    with pytest.raises(WorkdirError) as e:
        train.run(config_of(tmp_path / "not_read"), workdir)  # checked before data is read
    assert str(e.value) == (
        f"--workdir {workdir}: has checkpoints (steps {STEPS}) but no config.json, and they "
        "predate the config kept with each checkpoint; put the run's config.json back, or use "
        "a new workdir"
    )
    assert snapshot(workdir) == before


def test_a_new_workdir_that_fails_to_start_is_not_left_behind(tmp_path):
    config = config_of(tmp_path / "not_built")
    with pytest.raises(DataError):
        train.run(config, tmp_path / "w")  # fails after creating and locking the workdir
    assert not (tmp_path / "w").exists()
    with pytest.raises(ConfigError):
        train.run(config_of(tmp_path / "not_built", batch_size=0), tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # A folder that was there stays, with what it held.
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        train.run(config, tmp_path / "w")
    assert snapshot(tmp_path / "w") == {"notes.txt": b"mine"}


# ---------------------------------------------------------------------------------------------
# Item 6: values no user means, refused at start with the field's range
# ---------------------------------------------------------------------------------------------
def test_values_no_user_means_are_refused_at_start(trained, tiny_coco_dir, tmp_path):
    workdir = copy_of(trained, tmp_path)
    assert start_refused(workdir, "--config.optimizer.lr=-1") == [
        "error: config.optimizer.lr=-1.0: out of range; expected >= 0"
    ]

    cases = {
        "batch_size": (0, "config.batch_size=0: out of range; expected > 0"),
        "eval_batch_size": (-8, "config.eval_batch_size=-8: out of range; expected > 0"),
        "image_size": (0, "config.image_size=0: out of range; expected > 0"),
        "total_steps": (-1, "config.total_steps=-1: out of range; expected >= 0"),
        "num_epochs": (0.0, "config.num_epochs=0.0: out of range; expected > 0"),
        "eval_every_steps": (0, "config.eval_every_steps=0: out of range; expected > 0"),
        "log_every_steps": (0, "config.log_every_steps=0: out of range; expected > 0"),
        "keep_checkpoints": (0, "config.keep_checkpoints=0: out of range; expected >= 1"),
        "ema.decay": (1.5, "config.ema.decay=1.5: out of range; expected in [0, 1)"),
        "data.val_fraction": (
            1.0,
            "config.data.val_fraction=1.0: out of range; expected in [0, 1)",
        ),
        "data.std": (
            (0.2, 0.0, 0.2),
            "config.data.std=(0.2, 0.0, 0.2): out of range; expected each > 0",
        ),
        "data.eval_center_crop_from": (
            16,
            "config.data.eval_center_crop_from=16: out of range; expected >= "
            "config.image_size (32) (or 0: off)",
        ),
        "optimizer.lr": (float("nan"), "config.optimizer.lr=nan: out of range; expected >= 0"),
        "optimizer.min_lr": (
            0.1,
            "config.optimizer.min_lr=0.1: out of range; expected in [0, config.optimizer.lr "
            "(0.003)]",
        ),
        "optimizer.warmup_fraction": (
            1.0,
            "config.optimizer.warmup_fraction=1.0: out of range; expected in [0, 1)",
        ),
        "optimizer.weight_decay": (
            -0.1,
            "config.optimizer.weight_decay=-0.1: out of range; expected >= 0",
        ),
        "optimizer.b2": (1.0, "config.optimizer.b2=1.0: out of range; expected in [0, 1)"),
        "optimizer.pct_start": (
            2.0,
            "config.optimizer.pct_start=2.0: out of range; expected in [0, 1]",
        ),
        "loss.clip": (-0.05, "config.loss.clip=-0.05: out of range; expected in [0, 1)"),
    }
    for field, (value, message) in cases.items():
        config = config_of(tiny_coco_dir)
        config.update_from_flattened_dict({field: value})
        with pytest.raises(ConfigError) as e:
            train.check_config(config)
        assert str(e.value) == message, field
    train.check_config(config_of(tiny_coco_dir, data__eval_center_crop_from=36))
    # What a model needs of the image size is a ConfigError too (ViT and CLIP backbones).
    with pytest.raises(ConfigError) as e:
        layers.patch_grid(100, 16)
    assert str(e.value) == (
        "config.image_size=100: the backbone cuts 16-pixel patches; expected a multiple of 16 "
        "(e.g. 96 or 112)"
    )


# ---------------------------------------------------------------------------------------------
# Item 8: an unknown config field names the config, the level and its fields
# ---------------------------------------------------------------------------------------------
def test_an_unknown_config_field_names_the_config_and_the_fields_of_its_level(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    assert start_refused(workdir, "--config.optimizer.foo=1") == [
        "error: --config.optimizer.foo=1: no config field 'foo' in config.optimizer of "
        "configs/baseline_demo.py (its fields: b1, b2, base_momentum, clip_grad_norm, "
        "cycle_momentum, div_factor, eps, final_div_factor, frozen, layer_decay, lr, lr_mults, "
        "max_momentum, min_lr, momentum, name, pct_start, schedule, skip_nonfinite, "
        "warmup_fraction, weight_decay)"
    ]
    # The same from evaluate (and bench), which ended in a traceback.
    proc = cli(
        "evaluate",
        *("--checkpoint", str(tmp_path / "none"), "--config", "configs/baseline_demo.py"),
        "--config.model.backbone_kwargs.depth=3",
    )
    assert proc.returncode == 2
    assert errors_of(proc.stderr) == [
        "error: --config.model.backbone_kwargs.depth=3: no config field 'depth' in "
        "config.model.backbone_kwargs of configs/baseline_demo.py (its fields: widths)"
    ]


def test_config_problem_explains_each_kind_of_bad_override():
    from mlgraph import cli as mlgraph_cli

    base = ["--config", "configs/baseline_demo.py"]

    def problem(override: str) -> str:
        return mlgraph_cli.config_problem(AttributeError("'x'"), [*base, override])

    assert problem("--config.optimizer.lr.x=1") == (
        "--config.optimizer.lr.x=1: config.optimizer.lr of configs/baseline_demo.py is a float, "
        "not a group of fields"
    )
    assert problem("--config.optimizer.lrr=1") == (
        "--config.optimizer.lrr=1: no config field 'lrr' (did you mean \"lr\"?)"
    )
    assert problem("--noconfig.early_stopp") == (
        "--noconfig.early_stopp: no config field 'early_stopp' (did you mean \"early_stop\"?)"
    )
    # A config argument get_config refuses: its message, not ml_collections' traceback.
    error = ValueError("Error whilst parsing config file:\n\nTraceback ...\nValueError: config "
                       "argument 'x': unknown; known: runlocal")  # fmt: skip
    assert mlgraph_cli.config_problem(error, ["--config", "configs/baseline_demo.py:x=1"]) == (
        "--config configs/baseline_demo.py:x=1: config argument 'x': unknown; known: runlocal"
    )
    top = mlgraph_cli.config_problem(KeyError("'foo'"), ["--config=configs/baseline_demo.py",
                                                          "--config.foo=1"])  # fmt: skip
    assert top.startswith(
        "--config.foo=1: no config field 'foo' in config of configs/baseline_demo.py (its "
        "fields: batch_size, best_metric, checkpoint_every_steps, data, dtype, early_stop, ema,"
    )

"""One way to open a run (mlgraph.workdir): every command that reads a workdir takes the same
step and says the same thing about a damaged one; the model is read, never initialised; an
earlier version's config.json reads in today's fields."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from train_helpers import tiny_config

from mlgraph import checkpointing, evaluate, init_from, models, predict, recipes, train
from mlgraph import workdir as workdirs
from mlgraph.data import augment
from mlgraph.errors import WorkdirError
from mlgraph.viz import __main__ as viz_cli


def salgl_config(data_dir):
    """A tiny SALGL on the tiny set: checkpoints at steps 2 and 4, evaluated (best) at 4."""
    c = tiny_config(data_dir, total_steps=4)
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    c.init_from = ""
    c.optimizer.frozen = ()
    c.loss = recipes.loss_config("salgl")
    c.model = recipes.model_config(
        "salgl",
        backbone="simple_cnn",
        backbone_kwargs={"widths": (8, 16)},
        num_scenes=2,
        num_steps=1,
        att_dim=8,
        ffn_dim=16,
        heads=2,
        embed_type="random",
    )
    return c


@pytest.fixture(scope="module")
def damaged(tiny_coco_dir, tmp_path_factory):
    """A SALGL workdir whose newest (and best) checkpoint, step 4, has every array file cut in
    half; step 2 is intact."""
    path = tmp_path_factory.mktemp("damaged") / "w"
    train.run(salgl_config(tiny_coco_dir), path)
    ckpts = checkpointing.TrainCheckpoints(path / "checkpoints")
    assert (ckpts.all_steps(), ckpts.best_step()) == ([2, 4], 4)
    step2 = ckpts.read_state(2)
    ckpts.close()
    for array_file in (path / "checkpoints" / "4" / "state").rglob("d/*"):
        array_file.write_bytes(array_file.read_bytes()[: array_file.stat().st_size // 2])
    return path, step2


def warnings_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


def test_every_command_takes_the_same_older_step_with_the_same_warning(
    damaged, tiny_coco_dir, tmp_path, capsys
):
    path, step2 = damaged
    capsys.readouterr()
    said = {}

    result = evaluate.evaluate_workdir(path)
    said["evaluate"] = warnings_of(capsys.readouterr().err)
    assert result["step"] == 2

    image = sorted((tiny_coco_dir.parent / "raw" / "val2014").glob("*.jpg"))[0]
    assert predict.main(["--workdir", str(path), str(image)]) == 0
    said["predict"] = warnings_of(capsys.readouterr().err)

    assert viz_cli.main(["heatmap", "--workdir", str(path), "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    said["viz heatmap"] = warnings_of(printed.err)
    assert f"{path}: step 2, EMA model counts, 2 learned scenes" in printed.out

    continued = init_from.read_workdir_state(str(path), salgl_config(tiny_coco_dir).model)
    said["init_from"] = warnings_of(capsys.readouterr().err)
    for got, want in zip(
        jax.tree.leaves(continued["params"]), jax.tree.leaves(step2["params"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)

    ckpts = path / "checkpoints"
    (line,) = said["evaluate"]
    assert line.startswith(f"warning: checkpoint step 4 in {ckpts} cannot be read (")
    assert line.endswith("); using step 2 instead (saved steps: 2, 4)")
    assert said == {command: [line] for command in said}
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]  # reading moves nothing


def test_a_step_asked_for_is_that_step_or_one_line(damaged, capsys):
    path, _ = damaged
    with pytest.raises(WorkdirError) as e:
        workdirs.read_state(path, 4)
    message = str(e.value)
    assert message.startswith(f"{path / 'checkpoints'}: cannot read step 4: ")
    assert message.endswith("; saved steps: 2, 4; pick another with --step N")
    assert "\n" not in message
    with pytest.raises(WorkdirError) as e:
        workdirs.read_state(path, 3)
    assert str(e.value) == f"--step 3: not saved in {path}; saved steps: [2, 4]"
    assert warnings_of(capsys.readouterr().err) == []


def test_open_run_reads_the_model_without_the_optimizer(damaged, capsys):
    path, step2 = damaged
    run = workdirs.open_run(path, 2, ema=False)
    assert run.step == 2 and set(run.state) == {"params", "rest", "ema", "extra", "step"}
    for got, want in zip(
        jax.tree.leaves(run.params), jax.tree.leaves(step2["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    ema = workdirs.open_run(path, 2)
    for got, want in zip(
        jax.tree.leaves(ema.params), jax.tree.leaves(step2["ema"]["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert run.config.init_from == "" and run.dataset.num_classes == 4
    # The model of the run: the live weights in the model's own structure.
    out = run.model()(np.zeros((1, 32, 32, 3), np.float32))
    assert out["logits"].shape == (1, 4)
    assert warnings_of(capsys.readouterr().err) == []


def old_format(config) -> dict:
    """`config` as the mlgraph of 2026-12-04 wrote it to config.json: the demo a flag on the
    COCO builder, the augmentation a dict of switches, every method's loss fields."""
    saved = json.loads(config.to_json_best_effort())
    saved["data"]["name"], saved["data"]["demo"] = "coco2014", "demo"
    saved["data"]["augment"] = {
        "flip": True,
        "cutout": 0.0,
        "randaugment": False,
        "multiscale_crop": [],
        "max_distort": 2,
        "crop_resize": 0,
        "crop_sides": [],
        "random_resized_crop": [],
        "random_resized_crop_ratio": [0.75, 1.3333333333333333],
        "interpolation": "bilinear",
        "timm_randaugment": "",
    }
    saved["loss"] |= {"lamda": 1.0, "rank_weight": 1.0, "alpha": 0.2, "label_lr_mult": 10.0}
    return saved


def test_an_earlier_config_json_reads_in_todays_fields(tmp_path):
    config = recipes_demo_config()
    config.loss = models.loss_settings(config)  # as training records it
    assert config.data.name == "demo" and config.data.augment == "resize_flip"
    (tmp_path / "config.json").write_text(json.dumps(old_format(config)))
    read = workdirs.read_config(tmp_path)
    assert json.loads(read.to_json_best_effort()) == json.loads(config.to_json_best_effort())
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # a saved step, of no config copy
    workdirs.check_same_run(tmp_path, workdirs.config_record(config))  # the same run: resumes
    config.data.augment = "salgl"
    with pytest.raises(WorkdirError, match=r"\(fields data.augment differ\)"):
        workdirs.check_same_run(tmp_path, workdirs.config_record(config))
    # Switches no chain makes stay as they were, and resuming names them.
    odd = old_format(config)
    odd["data"]["augment"]["cutout"] = 0.3
    assert workdirs.upgrade_config(odd)["data"]["augment"]["cutout"] == 0.3
    assert augment.chain_name_of(old_format(config)["data"]["augment"]) == "resize_flip"


def recipes_demo_config():
    c = recipes.demo_config()
    c.loss = recipes.loss_config("baseline")
    c.model = recipes.model_config("baseline", backbone="simple_cnn")
    return c

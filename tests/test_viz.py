"""mlgraph.viz: co-occurrence heatmaps and label clouds of SALGL's learned scenes."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from mlgraph import checkpointing, viz
from mlgraph.errors import ConfigError, WorkdirError
from mlgraph.viz import __main__ as viz_cli

REPO = pathlib.Path(__file__).resolve().parent.parent
NAMES = ["cat", "cup", "rocket", "moon", "traffic light"]

# (scene, labels, how many images): scene 0 is a kitchen (cat & cup), scene 1 space (rocket &
# moon), scene 2 collected nothing; "traffic light" never occurs.
IMAGES = [
    (0, ("cat", "cup"), 6),
    (0, ("cat",), 2),
    (0, ("cup", "moon"), 1),
    (1, ("rocket", "moon"), 5),
    (1, ("moon",), 3),
    (1, ("cat",), 1),
]


def synthetic_comatrix() -> np.ndarray:
    """Counts as SALGL's hard assignment accumulates them: C[k] += y y^T per image of scene k."""
    comatrix = np.zeros((3, len(NAMES), len(NAMES)), np.float32)
    for scene, labels, n in IMAGES:
        y = np.array([name in labels for name in NAMES], np.float32)
        comatrix[scene] += n * np.outer(y, y)
    return comatrix


def spec_prob(comatrix: np.ndarray) -> np.ndarray:
    """docs/salgl.md §6 written out element by element."""
    k, c, _ = comatrix.shape
    out = np.zeros((k, c, c))
    for s in range(k):
        for i in range(c):
            for j in range(c):
                if i != j:
                    out[s, i, j] = float(comatrix[s, i, j]) / (float(comatrix[s, i, i]) + 1e-8)
    return out


def png_size(path: pathlib.Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()  # fails on a truncated file
        return im.size


# ------------------------------------------------------------------------------ numbers


def test_cooccurrence_prob_matches_spec():
    comatrix = synthetic_comatrix()
    prob = viz.cooccurrence_prob(comatrix)
    np.testing.assert_allclose(prob, spec_prob(comatrix), rtol=1e-12, atol=0)
    cat, cup, rocket, moon = 0, 1, 2, 3
    assert prob[0, cat, cup] == pytest.approx(6 / 8)
    assert prob[0, cup, cat] == pytest.approx(6 / 7)
    assert prob[0, cup, moon] == pytest.approx(1 / 7)
    assert prob[1, rocket, moon] == pytest.approx(1.0)
    assert prob[1, moon, rocket] == pytest.approx(5 / 8)
    assert np.all(np.diagonal(prob, axis1=1, axis2=2) == 0)
    assert np.all(prob[2] == 0)  # the empty scene


def test_cloud_frequencies_hand_computed():
    freqs = viz.cloud_frequencies(synthetic_comatrix(), NAMES)
    # label totals over scenes: cat 8+1, cup 7, rocket 5, moon 1+8; traffic light 0
    assert freqs == [
        {"cat": 177, "cup": 200, "moon": 22},  # int(1600/9), 200, int(200/9)
        {"cat": 22, "rocket": 200, "moon": 177},
        {},
    ]


def test_scene_shares_and_label_counts():
    comatrix = synthetic_comatrix()
    np.testing.assert_allclose(viz.scene_shares(comatrix), [16 / 30, 14 / 30, 0.0])
    np.testing.assert_array_equal(
        viz.label_counts(comatrix), [[8, 7, 0, 1, 0], [1, 0, 5, 8, 0], [0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(viz.scene_shares(np.zeros((2, 3, 3))), [0.0, 0.0])


def test_select_classes():
    comatrix = synthetic_comatrix()
    assert viz.select_classes(comatrix, NAMES) == [0, 1, 2, 3, 4]
    # totals: cat 9, cup 7, rocket 5, moon 9 -> the 2 most frequent, in data set order
    assert viz.select_classes(comatrix, NAMES, top=2) == [0, 3]
    assert viz.select_classes(comatrix, NAMES, classes=["moon", "cat"]) == [3, 0]
    with pytest.raises(ConfigError) as e:
        viz.select_classes(comatrix, NAMES, classes=["cat", "dog", "ufo"])
    assert str(e.value) == (
        "--classes: unknown class name(s) 'dog', 'ufo'; known: cat, cup, rocket, moon, "
        "traffic light"
    )
    # More than 20 classes: the 20 most frequent by default.
    names = [f"c{i}" for i in range(25)]
    big = np.zeros((2, 25, 25))
    big[0, np.arange(25), np.arange(25)] = np.arange(25)  # class i counted i times
    assert viz.select_classes(big, names) == list(range(5, 25))


def test_match_demo_scenes():
    reference = {
        "scenes": ["home", "space"],
        "classes": ["moon", "cat", "cup", "rocket"],
        "class_probabilities": [[0.0, 0.5, 0.5, 0.0], [0.5, 0.0, 0.0, 0.5]],
    }
    matches = viz.match_demo_scenes(synthetic_comatrix(), NAMES, reference)
    assert [m[0] if m else None for m in matches] == ["home", "space", None]
    # scene 0 counts (cat 8, cup 7, moon 1) against (cat .5, cup .5)
    assert matches[0][1] == pytest.approx(15 / (np.sqrt(114) * np.sqrt(2)))


# ------------------------------------------------------------------------------ images


def test_heatmap_pixels_follow_probabilities():
    prob = viz.cooccurrence_prob(synthetic_comatrix())[0]
    fig = viz.heatmap_figure(prob, NAMES, "scene 0", annotate=False)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), prob)
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    height = rgba.shape[0]

    def pixel(i, j):
        x, y = ax.transData.transform((j, i))  # display coordinates, origin bottom left
        return rgba[int(round(height - y)), int(round(x)), :3].astype(int)

    hot, mid, cold = pixel(3, 1), pixel(0, 1), pixel(0, 2)  # P = 1.0, 0.75, 0
    assert hot.sum() > mid.sum() > cold.sum() + 200
    assert cold.max() < 20  # magma(0) is almost black


def test_heatmaps_write_one_png_per_scene(tmp_path):
    paths = viz.heatmaps(synthetic_comatrix(), NAMES, tmp_path / "out")
    assert [p.name for p in paths] == [f"heatmap_scene{k}.png" for k in range(3)]
    for p in paths:
        w, h = png_size(p)
        assert 600 <= w <= 2000 and 600 <= h <= 2000


def test_label_clouds_write_one_png_per_scene(tmp_path):
    paths = viz.label_clouds(synthetic_comatrix(), NAMES, tmp_path)
    assert [p.name for p in paths] == [f"labelcloud_scene{k}.png" for k in range(3)]
    for p in paths:
        assert png_size(p) == (800, 460)
    # White background with coloured words for a scene with labels; the empty scene is a
    # white page with a black notice only.
    with Image.open(paths[0]) as im:
        colours = np.asarray(im.convert("RGB")).reshape(-1, 3)
    coloured = (colours.max(axis=1) - colours.min(axis=1)) > 60
    assert (colours == 255).all(axis=1).mean() > 0.5 and coloured.mean() > 0.01
    with Image.open(paths[2]) as im:
        empty = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert ((empty.max(axis=1) - empty.min(axis=1)) > 60).sum() == 0
    assert (empty.min(axis=1) < 100).sum() > 100  # the notice text


def test_label_cloud_figure_empty_notice():
    fig = viz.label_cloud_figure({}, "scene 2: no labels counted")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["no labels were assigned to this scene"]
    assert fig.axes[0].get_title() == "scene 2: no labels counted"


# ------------------------------------------------------------------------------ CLI


def make_workdir(path: pathlib.Path, comatrix: np.ndarray | None, ema_comatrix=None):
    """A workdir with one training checkpoint (step 7) holding `comatrix` in the model (and
    `ema_comatrix` in the EMA model); None gives a baseline-like state without counts."""
    path.mkdir(parents=True, exist_ok=True)
    params = {"head": {"kernel": {"value": np.ones((2, 3), np.float32)}}}
    rest = {} if comatrix is None else {"comatrix": {"value": comatrix}}
    ema_rest = {} if comatrix is None else {"comatrix": {"value": ema_comatrix}}
    state = {
        "params": params,
        "rest": rest,
        "opt": {"count": np.zeros((), np.int32)},
        "ema": {"params": params, "rest": ema_rest},
        "step": np.asarray(7, np.int32),
    }
    ckpts = checkpointing.TrainCheckpoints(path / "checkpoints")
    ckpts.save(7, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {"ema_mAP": 50.0})
    ckpts.close()
    (path / "names.txt").write_text("\n".join(NAMES) + "\n")
    return path


@pytest.fixture(scope="module")
def salgl_workdir(tmp_path_factory):
    comatrix = synthetic_comatrix()
    # The live model's counts have the scenes in another order, to tell them apart.
    return make_workdir(tmp_path_factory.mktemp("salgl"), comatrix[[1, 0, 2]], comatrix / 2)


def test_read_comatrix(salgl_workdir):
    comatrix = synthetic_comatrix()
    ema, step = viz.read_comatrix(salgl_workdir)
    assert step == 7
    np.testing.assert_array_equal(ema, comatrix / 2)
    live, _ = viz.read_comatrix(salgl_workdir, step=7, ema=False)
    np.testing.assert_array_equal(live, comatrix[[1, 0, 2]])
    with pytest.raises(WorkdirError) as e:
        viz.read_comatrix(salgl_workdir, step=3)
    assert str(e.value) == f"--step 3: not saved in {salgl_workdir}; saved steps: [7]"


def test_cli_heatmap(salgl_workdir, tmp_path, capsys, monkeypatch):
    args = ["--workdir", str(salgl_workdir), "--classes_file", str(salgl_workdir / "names.txt")]
    assert viz_cli.main(["heatmap", *args, "--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"heatmap_scene{k}.png" for k in range(3)]
    out = capsys.readouterr().out
    assert f"{salgl_workdir}: step 7, EMA model counts, 3 learned scenes" in out
    assert "scene 0: 53.3% of counted labels, most counted: cat, cup, moon ->" in out
    assert "scene 2: 0.0% of counted labels, most counted: none ->" in out

    # --no-ema reads the live counts (scenes 0 and 1 swapped); --classes picks the axes.
    monkeypatch.chdir(tmp_path)
    assert (
        viz_cli.main(["heatmap", *args, "--no-ema", "--classes", "moon,rocket", "--output", "x"])
        == 0
    )
    out = capsys.readouterr().out
    assert "model counts" in out and "EMA" not in out
    assert "scene 0: 46.7% of counted labels, most counted: moon, rocket, cat -> x/" in out
    with Image.open("x/heatmap_scene0.png") as im:
        assert im.size[0] < 1000  # 2 classes: the smallest figure


def test_cli_labelcloud_default_output(salgl_workdir, capsys):
    names = str(salgl_workdir / "names.txt")
    assert (
        viz_cli.main(["labelcloud", "--workdir", str(salgl_workdir), "--classes_file", names]) == 0
    )
    written = sorted(p.name for p in (salgl_workdir / "viz").iterdir())
    assert written == [f"labelcloud_scene{k}.png" for k in range(3)]
    assert "scene 1: 46.7% of counted labels, most counted: moon, rocket, cat" in (
        capsys.readouterr().out
    )


def test_cli_errors(salgl_workdir, tmp_path, capsys):
    names = str(salgl_workdir / "names.txt")
    baseline = make_workdir(tmp_path / "baseline", None)
    code = viz_cli.main(["heatmap", "--workdir", str(baseline), "--classes_file", names])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: --workdir {baseline}: the step 7 checkpoint of the EMA model has no scene "
        "co-occurrence counts ('comatrix'); heatmaps need a SALGL run\n"
    )
    code = viz_cli.main(["labelcloud", "--workdir", str(baseline), "--classes_file", names])
    assert code == 2
    assert capsys.readouterr().err.endswith("; label clouds need a SALGL run\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert viz_cli.main(["heatmap", "--workdir", str(empty)]) == 2
    assert capsys.readouterr().err == (
        f"error: --workdir {empty}: no checkpoints in {empty / 'checkpoints'}\n"
    )

    args = ["heatmap", "--workdir", str(salgl_workdir), "--classes_file", names]
    assert viz_cli.main([*args, "--classes", "cat,dog"]) == 2
    assert capsys.readouterr().err == (
        "error: --classes: unknown class name(s) 'dog'; known: cat, cup, rocket, moon, "
        "traffic light\n"
    )
    short = tmp_path / "short.txt"
    short.write_text("cat\ncup\n")
    assert viz_cli.main(["heatmap", "--workdir", str(salgl_workdir), "--classes_file", str(short)])
    assert capsys.readouterr().err == (
        f"error: --classes_file {short}: 2 class names, but the checkpoint's comatrix counts "
        "5 classes\n"
    )
    # Without --classes_file the workdir's config.json names the data set.
    assert viz_cli.main(["heatmap", "--workdir", str(salgl_workdir)]) == 2
    assert capsys.readouterr().err == (
        f"error: --workdir {salgl_workdir}: no config.json; not a training workdir\n"
    )


def test_cli_class_names_from_config(tmp_path, capsys, tiny_coco_dir):
    """Without --classes_file the names come from the data set of the workdir's config.json."""
    from train_helpers import tiny_config

    config = tiny_config(tiny_coco_dir)
    # Classes in category-id order: person, motorcycle, train, cat.
    comatrix = np.zeros((2, 4, 4), np.float32)
    comatrix[0] = np.diag([3, 0, 0, 5])
    comatrix[1] = np.diag([1, 4, 2, 0])
    workdir = make_workdir(tmp_path / "run", comatrix, comatrix)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    assert viz_cli.main(["heatmap", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "scene 0: 53.3% of counted labels, most counted: cat, person ->" in out
    assert "scene 1: 46.7% of counted labels, most counted: motorcycle, train, person ->" in out
    assert "demo scene" not in out  # not the demo data set: no scene matching


def test_module_entry_point_exit_status(salgl_workdir, tmp_path):
    """`python -m mlgraph.viz` as a process: exit 0 and the files, exit 2 and one line."""
    names = str(salgl_workdir / "names.txt")
    cmd = [sys.executable, "-m", "mlgraph.viz", "labelcloud", "--classes_file", names]
    ok = subprocess.run(
        [*cmd, "--workdir", str(salgl_workdir), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "o").glob("labelcloud_scene*.png"))) == 3
    bad = subprocess.run(
        [*cmd, "--workdir", str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: --workdir {tmp_path / 'missing'}: does not exist"
    )

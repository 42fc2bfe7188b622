"""SSGRL: official-layout checkpoint -> mlgraph SSGRL, against a plain-torch SSGRL written from
docs/ssgrl_mlgcn.md.

The torch model follows docs/ssgrl_mlgcn.md §1 with the official attribute names (§2.2): a
torchvision-style ResNet `resnet_101` (reduced: one block per stage, width 4, so D = 128) and
its `avgpool1`, `word_semantic.fc_{1,2,3,a}`, `graph_net.fc_eq{3,4,5}_{w,u}` (with the official
reset gate reusing `fc_eq3_u`), `fc_output`, `classifiers`. Word vectors and the graph are plain
attributes, as in the official code, and reach the converter as .npy files. Also: the
co-occurrence statistics against the formulas of docs/ssgrl_mlgcn.md §1.4 and the
'train_labels' resolution.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import PYTHON2, randomize_batch_norms
from train_helpers import TINY_COCO_TRAIN

from mlgraph import assets, models, recipes
from mlgraph.convert import core, io
from mlgraph.convert import ssgrl as convert_ssgrl
from mlgraph.convert.__main__ import main
from mlgraph.errors import ConfigError
from mlgraph.labels import cooccurrence
from mlgraph.models import ssgrl
from mlgraph.torch_reference.ssgrl import TorchResNet, TorchSSGRL

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

RTOL = 1e-4
C, E, A, IMAGE = 5, 12, 16, 128


def _torch_model(seed: int, tmp_path, *, paper: bool = False):
    rng = np.random.default_rng(seed)
    words = rng.normal(size=(C, E)).astype(np.float32)
    y = rng.random((40, C)) < 0.5
    graph = cooccurrence.conditional_probability(cooccurrence.counts_from_labels(y))
    torch.manual_seed(seed)
    model = TorchSSGRL(TorchResNet((1, 1, 1, 1), 4), words, graph, att_dim=A, paper=paper)
    randomize_batch_norms(model, torch.Generator().manual_seed(seed))
    np.save(tmp_path / "vectors.npy", words)
    np.save(tmp_path / "prob_train.npy", graph)
    return model.eval()


def _options(tmp_path, **extra):
    return {
        "embed_path": str(tmp_path / "vectors.npy"),
        "graph_path": str(tmp_path / "prob_train.npy"),
        "image_size": IMAGE,
    } | extra


def _images(b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, IMAGE, IMAGE, 3)).astype(np.float32)


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _rel(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("paper", [False, True])
def test_official_checkpoint_converts_and_matches_torch(tmp_path, capsys, paper):
    tm = _torch_model(0, tmp_path, paper=paper)
    # What main.py saves (Python-2-era legacy serialisation, protocol 2), read back by io.
    path = tmp_path / "model_best_coco.pth"
    torch.save(
        {"epoch": 7, "state_dict": tm.state_dict(), "best_mAP": 83.8},
        path,
        pickle_protocol=2,
        _use_new_zipfile_serialization=False,
    )
    sd = io.read_state_dict(path)
    assert "resnet_101.layer4.0.bn3.num_batches_tracked" in sd
    assert not any("word_features" in k or "matrix" in k for k in sd)
    module, settings = convert_ssgrl.convert(sd, _options(tmp_path, reset_uses_update_u=not paper))
    assert settings["num_classes"] == C and settings["image_size"] == IMAGE
    model = core.build_fields(settings)
    assert model["backbone"] == "resnet50"
    assert model["backbone_kwargs"] == {"layers": [1, 1, 1, 1], "width": 4}
    assert (model["embed_dim"], model["att_dim"]) == (E, A)
    assert model["reset_uses_update_u"] is (not paper)
    np.testing.assert_array_equal(module.graph[...], np.load(tmp_path / "prob_train.npy"))

    x = _images(3, 1)
    want = _torch_logits(tm, x)
    got = nnx.jit(lambda m, x: m(x, train=False))(module, jnp.asarray(x))
    rel = _rel(got["logits"], want)
    assert rel < RTOL, f"max relative logit difference {rel:.2e}"
    assert got["att_weights"].shape == (3, C, (IMAGE // 64) ** 2)
    np.testing.assert_allclose(np.asarray(got["att_weights"]).sum(-1), 1.0, rtol=1e-5)
    with capsys.disabled():
        print(f"\nSSGRL conversion (paper gate={paper}): max relative logit diff {rel:.2e}")

    # The settings rebuild the same tree.
    rebuilt = nnx.eval_shape(
        lambda: models.build(
            model,
            num_classes=C,
            image_size=IMAGE,
            rngs=nnx.Rngs(0),
        )
    )
    spec = lambda m: {p: tuple(v.shape) for p, v in core.variable_paths(m).items()}  # noqa: E731
    assert spec(rebuilt) == spec(module)


def _save_as_python2_main(model, path, **extra):
    """What the official main.py saves under Python 2.7 / PyTorch 0.4.1: {'epoch', 'state_dict',
    'best_mAP'} with `best_mAP` the numpy.float64 of its mAP function, in the legacy format,
    pickled as Python 2 does (raw 8-bit strings, readable only with encoding='latin1')."""
    torch.save(
        {"epoch": 12, "state_dict": model.state_dict(), "best_mAP": np.float64(83.81), **extra},
        path,
        pickle_module=PYTHON2,
        pickle_protocol=2,
        _use_new_zipfile_serialization=False,
    )


def test_python2_container_converts_through_the_cli(tmp_path, capsys):
    tm = _torch_model(3, tmp_path)
    path = tmp_path / "model_best_coco.pth.tar"
    _save_as_python2_main(tm, path)
    out = tmp_path / "converted"
    argv = ["--source", "ssgrl", "--input", str(path), "--output", str(out)]
    for key, value in _options(tmp_path).items():
        argv += ["--option", f"{key}={value}"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path} -> {out}: ")
    assert lines[1:] == [
        "note: container: weights under 'state_dict'; other entries: epoch=12; "
        "best_mAP=83.81 (numpy.float64)"
    ]
    module = core.load_converted(out)
    x = _images(2, 4)
    got = nnx.jit(lambda m, x: m(x)["logits"])(module, jnp.asarray(x))
    assert _rel(got, _torch_logits(tm, x)) < RTOL

    # The same container with an object of another class: refused in one line.
    other = tmp_path / "with_args.pth.tar"
    _save_as_python2_main(tm, other, args=argparse.Namespace(lr=1e-5))
    argv[3], argv[5] = str(other), str(tmp_path / "refused")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {other}: refused by torch.load(weights_only=True): ")
    assert "argparse.Namespace" in err and "--option trust_pickle=true" in err


def test_train_mode_batch_norm_only_in_layer4(tmp_path):
    """bn_train='layer4' = official mode switching: backbone eval, then layer4 train."""
    tm = _torch_model(1, tmp_path)
    module, _ = convert_ssgrl.convert(core.to_numpy_state_dict(tm.state_dict()), _options(tmp_path))
    tm.train()
    tm.resnet_101.eval()
    tm.resnet_101.layer4.train()
    x = _images(4, 2)
    want = _torch_logits(tm, x)
    before = jax.tree.map(np.asarray, nnx.state(module.backbone, nnx.BatchStat))
    got = module(jnp.asarray(x), train=True)
    assert _rel(got["logits"], want) < RTOL
    after = nnx.state(module.backbone, nnx.BatchStat)
    np.testing.assert_array_equal(
        after["layer3"][0]["bn1"]["mean"][...], before["layer3"][0]["bn1"]["mean"]
    )
    np.testing.assert_allclose(
        after["layer4"][0]["bn1"]["mean"][...],
        tm.resnet_101.layer4[0].bn1.running_mean.numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_conversion_errors(tmp_path):
    tm = _torch_model(2, tmp_path)
    sd = core.to_numpy_state_dict(tm.state_dict())
    with pytest.raises(core.ConversionError, match="option graph_path is required"):
        convert_ssgrl.convert(sd, {"embed_path": str(tmp_path / "vectors.npy")})
    broken = {k: v for k, v in sd.items() if k != "graph_net.fc_eq4_u.bias"}
    broken["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(
        core.ConversionError,
        match=r"missing keys \(1\): graph_net.fc_eq4_u.bias \| unexpected keys \(1\): extra.weight",
    ):
        convert_ssgrl.convert(broken, _options(tmp_path))
    np.save(tmp_path / "bad.npy", np.zeros((C, C + 1), np.float32))
    with pytest.raises(core.ConversionError, match=r"bad.npy: holds an array of shape \(5, 6\)"):
        convert_ssgrl.convert(sd, _options(tmp_path, graph_path=str(tmp_path / "bad.npy")))
    with pytest.raises(core.ConversionError, match="not an SSGRL state dict: missing fc_output"):
        convert_ssgrl.convert(
            {k: v for k, v in sd.items() if "fc_output" not in k}, _options(tmp_path)
        )


def test_cooccurrence_statistics_match_the_formulas():
    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.35).astype(np.float32)
    y[:, 5] = 0  # a class never seen
    counts = cooccurrence.counts_from_labels(y)
    for i in range(6):
        for j in range(6):
            assert counts[i, j] == sum(y[n, i] * y[n, j] for n in range(50))
    m = cooccurrence.conditional_probability(counts)
    for i in range(5):
        for j in range(6):
            both = np.sum((y[:, i] > 0) & (y[:, j] > 0))
            assert m[i, j] == pytest.approx(both / np.sum(y[:, i] > 0), rel=1e-6)
    np.testing.assert_array_equal(m[5], 0.0)
    np.testing.assert_array_equal(np.diag(m)[:5], 1.0)
    np.testing.assert_array_equal(
        np.diag(cooccurrence.conditional_probability(counts, "zero")), 0.0
    )
    with pytest.raises(ConfigError, match="graph diagonal 'two'"):
        cooccurrence.conditional_probability(counts, "two")


def test_train_labels_resolution_and_graph_files(tiny_coco_dir):
    import ml_collections

    from mlgraph.data import datasets
    from mlgraph.data.cooccurrence import split_labels

    cfg = ml_collections.ConfigDict(
        {
            "data": {"train_split": "train"},
            "model": recipes.model_config("ssgrl", graph_path="train_labels", embed_dim=3),
        }
    )
    built = datasets.make_builder("coco2014", tiny_coco_dir, "").data_dir
    resolved = assets.resolve_graph(cfg, built)
    assert cfg.model.graph_path == "train_labels"  # the input is not modified
    path = resolved.model.graph_path
    assert path.endswith("cooccurrence_train.npz")
    labels = split_labels(built, "train")
    assert labels.shape == (TINY_COCO_TRAIN, 4)
    counts = cooccurrence.load_counts(path, 4, "graph")
    np.testing.assert_array_equal(counts, labels.T @ labels)
    graph = ssgrl.load_graph(path, 4)
    np.testing.assert_allclose(graph, cooccurrence.conditional_probability(labels.T @ labels))
    with pytest.raises(ConfigError, match=r"config.model.graph_path=.*: counts of shape \(4, 4\)"):
        ssgrl.load_graph(path, 3)
    with pytest.raises(ConfigError, match="must be resolved to a file first"):
        models.build(cfg.model, num_classes=4, image_size=64, rngs=nnx.Rngs(0))

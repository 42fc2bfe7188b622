"""`bench --against torch`: the torch model it times computes what mlgraph's does, from the
same weights, and trains the same parameters (SALGL, SSGRL, Query2Label); without torch the
flag names the install command."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mlgraph import bench_torch, optim, recipes, train_step
from mlgraph.errors import ConfigError

torch = pytest.importorskip("torch")

RTOL = 1e-4  # the SALGL parity tests' tolerance, relative to the largest |logit|


def _config():
    c = recipes.salgl(dataset="coco2014", backbone="resnet50", image_size=64, num_scenes=3)
    c.batch_size = 2
    c.model.backbone_kwargs = {"layers": (1, 1, 1, 1), "width": 8}
    c.model.update(num_steps=1, embed_type="checkpoint", embed_path="", embed_dim=8)
    c.model.update(att_dim=16, ffn_dim=32, pos=True)
    c.init_from = ""
    return c


def _ssgrl_config(tmp_path):
    c = recipes.ssgrl(dataset="coco2014")
    c.image_size, c.batch_size = 64, 2
    rng = np.random.default_rng(1)
    np.save(tmp_path / "words.npy", rng.normal(size=(5, 12)))
    np.save(tmp_path / "graph.npy", rng.random((5, 5)))
    c.model.update(backbone_kwargs={"layers": (1, 1, 1, 1), "width": 8}, att_dim=16)
    c.model.embed_path = str(tmp_path / "words.npy")
    c.model.graph_path = str(tmp_path / "graph.npy")
    return c


def _q2l_config(_tmp_path):
    c = recipes.q2l(dataset="coco2014", image_size=64)
    c.batch_size = 2
    c.model.update(backbone_kwargs={"layers": (1, 1, 1, 1), "width": 8}, keep_input_proj=True)
    c.model.update(hidden_dim=32, num_heads=2, ffn_dim=48, enc_layers=1, dec_layers=2)
    return c


CONFIGS = {"salgl": lambda _tmp_path: _config(), "ssgrl": _ssgrl_config, "q2l": _q2l_config}
# Trainable values of the tiny models (ResNet (1, 1, 1, 1) of width 8: layer4 256 channels),
# counted by hand from the recipes' frozen sets. SALGL trains everything. SSGRL trains layer4
# (94,208 conv + 1,280 batch norm) and the head (attention 4,577, the gated GNN's six 2D->D and
# D->D layers 591,360, fc_output 131,328, classifiers 1,285). Query2Label freezes conv1,
# layer1 and every batch norm: layer2-4 convolutions 123,648, input_proj 8,224, the encoder
# layer 7,504, two decoder layers without self-attention 7,504 each, the decoder norm 64,
# queries 160, classifiers 165.
TRAINABLE = {"ssgrl": 95_488 + 728_550, "q2l": 154_773}


@pytest.mark.parametrize(
    "name",
    # slow for q2l (28 s): its forward parity with the torch structure is in CI through
    # test_q2l's test_release_converts_and_matches_torch.
    [pytest.param(n, marks=pytest.mark.slow) if n == "q2l" else n for n in sorted(CONFIGS)],
)
def test_the_torch_model_gives_mlgraphs_logits_on_the_same_weights(name, tmp_path):
    c = CONFIGS[name](tmp_path)
    tm, (mod, graphdef, tx, state, built), _ = bench_torch.build_pair(c, 5)
    assert built.dtype == "float32"  # float32 on CPU, both sides
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    method = bench_torch.METHODS[name]()
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        want = method.eval_logits(tm.eval(), x).numpy()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    got = np.asarray(jax.jit(lambda x: model(x, train=False)["logits"])(images))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < RTOL, rel
    # Both sides train the same values: the parameters mlgraph freezes get no torch gradient.
    n_torch = sum(p.numel() for p in tm.parameters() if p.requires_grad)
    assert n_torch == optim.trainable_size(state["params"], built.optimizer)
    n_all = sum(p.numel() for p in tm.parameters())
    assert n_torch == TRAINABLE.get(name, n_all)


def test_ssgrl_train_steps_give_the_same_loss_and_update(tmp_path):
    """SSGRL has no dropout: the first train step's loss (layer4's batch norms in train mode,
    BCE) is the same number in both frameworks, and so is the Adam update of the classifier."""
    c = _ssgrl_config(tmp_path)
    c.batch_size = 4
    tm, (mod, graphdef, tx, state, built), method = bench_torch.build_pair(c, 5)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((4, 64, 64, 3)).astype(np.float32)
    labels = (rng.random((4, 5)) < 0.4).astype(np.float32)
    before = np.asarray(state["params"]["classifiers"]["weight"][...])
    batch = {"image": images, "labels": labels, "index": np.arange(4, dtype=np.int32)}
    new_state, metrics = jax.jit(train_step.make_train_step(mod, graphdef, tx, built, 1000))(
        state, batch
    )
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_loss = bench_torch.make_torch_step(tm, method, built, x, torch.from_numpy(labels))()
    assert float(metrics["loss"]) == pytest.approx(torch_loss.item(), rel=1e-5)
    got = np.asarray(new_state["params"]["classifiers"]["weight"][...]) - before
    want = tm.classifiers.weight.detach().numpy() - before
    assert np.abs(got).max() == pytest.approx(c.optimizer.lr, rel=1e-3)  # Adam's first step
    np.testing.assert_allclose(got, want, atol=c.optimizer.lr * 1e-2)


@pytest.mark.slow  # times two whole train steps a few times each (about 75 s)
def test_bench_against_torch_times_both_and_gives_the_ratio():
    c = _config()
    c.batch_size = 8  # one image per simulated device
    result = bench_torch.bench_against_torch(c, steps=1, num_classes=5)
    for key in ("mlgraph_train_images_per_s", "torch_train_images_per_s"):
        assert result[key] > 0
    assert result["train_speedup"] == pytest.approx(
        result["mlgraph_train_images_per_s"] / result["torch_train_images_per_s"]
    )
    assert result["eval_speedup"] == pytest.approx(
        result["mlgraph_eval_images_per_s"] / result["torch_eval_images_per_s"]
    )


def test_without_torch_or_a_torch_model_the_errors_say_why(monkeypatch):
    c = _config()
    c.model = recipes.model_config("baseline")
    with pytest.raises(ConfigError) as e:
        bench_torch.build_pair(c, 5)
    assert str(e.value) == (
        "--against torch: config.model.name='baseline' has no torch model; one exists for "
        "salgl, ssgrl, q2l, sigrl, mlgcn, scob, spml"
    )
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConfigError) as e:
        bench_torch.build_pair(_config(), 5)
    assert str(e.value) == (
        "this needs PyTorch: pip install torch==2.13.0 (the CPU build), or "
        "pip install 'mlgraph[convert]'"
    )

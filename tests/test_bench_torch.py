"""`bench --against torch`: the torch model it times computes what mlgraph's does, from the
same weights; without torch the flag names the install command."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mlgraph import bench_torch, recipes
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


def test_the_torch_model_gives_mlgraphs_logits_on_the_same_weights():
    c = _config()
    tm, (mod, graphdef, tx, state, built) = bench_torch.build_pair(c, 5)
    assert c.dtype == "bfloat16" and built.dtype == "float32"  # float32 on CPU, both sides
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = tm.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))["logits"].numpy()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    got = np.asarray(jax.jit(lambda x: model(x, train=False)["logits"])(images))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < RTOL, rel
    # The same numbers of weights on both sides, none left at mlgraph's own initialisation.
    n_torch = sum(p.numel() for p in tm.parameters())
    assert n_torch == sum(x.size for x in jax.tree.leaves(state["params"]))


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
        "--against torch: config.model.name='baseline' has no torch model; one exists for salgl"
    )
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConfigError) as e:
        bench_torch.build_pair(_config(), 5)
    assert str(e.value) == (
        "this needs PyTorch: pip install torch==2.13.0 (the CPU build), or "
        "pip install 'mlgraph[convert]'"
    )

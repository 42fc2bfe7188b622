"""SSGRL trains as its released loop does: 30 steps of mlgraph's train step, built from the
paper recipe (`recipes.ssgrl`: Adam 1e-5 at a constant rate on layer4 and the head, layer4's
batch norms in train mode, the rest of the backbone frozen in eval mode, BCE, no EMA), against
the transcription of the official `main.py` (`mlgraph.torch_reference.ssgrl_train`), from the
same weights (the torch model's, through `mlgraph.convert.ssgrl`) on the same 10 fixed batches
for 3 epochs. Only the model (ResNet (1, 1, 1, 1) of width 8, attention width 16, 5 classes),
the images (64 px), the batch (4) and the run's length are shrunk.

Every step's loss is compared, and after the last step the parameters, layer4's running
statistics and Adam's moments; the transcription's first step is the single-step parity of
tests/test_bench_torch.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from parity_steps import build as build_both
from parity_steps import measure_free, random_batches, torch_batches
from torch_train_compare import ADAM_SLOTS

from mlgraph import bench_torch, recipes
from mlgraph.torch_reference import ssgrl_train

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, B, SIZE, BATCHES, EPOCHS = 5, 4, 64, 10, 3
# Tolerances, relative: a step's loss to torch's, a tensor's change (L2 over the tensor) to
# torch's change of it, a moment to torch's. The torch run's own float32-vs-float64 drift over
# these 30 steps (`measure(..., drift=True)`: a float64 run from the same weights and batches):
# losses 1.6e-7, parameter changes 1.8e-3 (Adam's steps on entries whose gradient is float
# noise are noise of lr's size), running statistics 3.4e-7, Adam's first moments 1.9e-6,
# second 1.3e-6. mlgraph against the float32 run: 2.5e-7, 8.0e-5, 2.6e-7, 2.1e-6, 1.3e-5; its
# learning rate (float32) 2.5e-8 from torch's 1e-5.
TOL = {"loss": 2e-6, "lr": 1e-6, "params": 1e-2, "rest": 5e-6, "mu": 5e-5, "nu": 2e-4}


def _config(tmp_path):
    c = recipes.ssgrl(dataset="coco2014")
    c.image_size, c.batch_size, c.num_epochs = SIZE, B, float(EPOCHS)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "words.npy", rng.normal(size=(C, 12)))
    np.save(tmp_path / "graph.npy", rng.random((C, C)))
    c.model.update(backbone_kwargs={"layers": (1, 1, 1, 1), "width": 8}, att_dim=16)
    c.model.embed_path = str(tmp_path / "words.npy")
    c.model.graph_path = str(tmp_path / "graph.npy")
    return c


def measure(config, mlgraph_changes=None, drift: bool = False, pair=None) -> dict:
    """`parity_steps.measure_free` of `config` with the SSGRL transcription."""
    shape = (BATCHES, B, SIZE)
    return measure_free(
        ssgrl_train.train, config, C, shape, EPOCHS, ADAM_SLOTS,
        pair=pair, mlgraph_changes=mlgraph_changes, drift=drift,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(config, `build_both`'s pair, an untrained copy of its torch model), made once: both
    tests start from these weights."""
    config = _config(tmp_path_factory.mktemp("ssgrl"))
    pair = build_both(config, C)
    return config, pair, copy.deepcopy(pair[0])


def test_30_steps_follow_the_official_loop(built):
    config, pair, _ = built
    errors = measure(config, pair=pair)
    assert list(errors.pop("lrs")) == [1e-5] * BATCHES * EPOCHS  # constant, the official rate
    for kind, (error, where) in errors.items():
        assert error < TOL[kind], (kind, where, error)


def test_the_first_official_step_is_the_single_step_parity(built):
    """The transcription's first iteration is the torch step of test_bench_torch's single-step
    parity (`bench_torch.make_torch_step` on `build_pair`'s model, against which that test
    checks mlgraph's first step): the same loss and the same weights after it, to the bit
    (both are main.py's forward, BCE and Adam, on the same parameters)."""
    _, (_, (_, _, _, config), _), untrained = built
    tm, generic = copy.deepcopy(untrained), copy.deepcopy(untrained)
    images, labels = random_batches(1, B, SIZE, C, seed=3)
    (x, y), *_ = torch_batches(images, labels)
    loop = ssgrl_train.SSGRLLoop(tm)
    loop.start_epoch(0)
    loss = loop.step(x, y)
    want = bench_torch.make_torch_step(generic, bench_torch.METHODS["ssgrl"](), config, x, y)()
    assert loss.item() == want.item()
    for (name, p), q in zip(tm.state_dict().items(), generic.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

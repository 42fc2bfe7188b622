"""ML-GCN trains as its released loop does: 30 steps of mlgraph's train step, built from the
paper recipe (`recipes.mlgcn`: SGD with momentum 0.9 and L2 1e-4 on every parameter, lr 0.1 for
the graph convolutions and 0.01 for the backbone, x0.1 at the start of each milestone epoch,
gradients clipped to norm 10, BCE), beside the transcription of the official `engine.py` +
`demo_coco_gcn.py` (`mlgraph.torch_reference.mlgcn_train`), from the same weights (the torch
model's, through `mlgraph.convert.mlgcn`) on the same 10 fixed batches for 3 epochs. Only the
model (ResNet (1, 1, 1, 1) of width 8, hidden width 16, 5 classes), the images (64 px), the batch
(4), the run's length and the milestone (`--epoch_step 2`, so that the decay falls inside the
run: the official 30 is after its 20 epochs) are shrunk.

At this size the official recipe is chaotic: lr 0.1 moves the tiny graph convolutions by large
steps, and the global max pooling (and the stem's 3x3 max pool) routes each gradient to one
location, so a near tie that float32 and float64 round apart sends the two runs apart: the torch
run's own float32 and float64 losses, free running from these weights on these batches, stay
within 2e-5 for 12 steps, jump to 1e-2 at step 13 and reach 3.7e-1 at step 22 (other seeds jump
between steps 5 and 15). No implementation can follow another float32 run there, so mlgraph runs
in lockstep: before every step its parameters and running statistics are set to torch's, its
optimizer state (the momentum buffers), step count and schedule running on their own for the 30
steps. Each step's loss and update (of every tensor, parameters and running statistics) is
compared, and after the last step the momentum buffers.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from parity_steps import build as build_both
from parity_steps import random_batches, run_lockstep, torch_lockstep_drift
from torch_train_compare import optimizer_slots, relative_l2, to_mlgraph, worst

from mlgraph import optim, recipes
from mlgraph.errors import ConfigError
from mlgraph.labels import cooccurrence
from mlgraph.torch_reference import mlgcn_train
from mlgraph.torch_reference.training import optimizer_state

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, B, SIZE, BATCHES, EPOCHS = 5, 4, 64, 10, 3
MILESTONE = 2  # --epoch_step: the rate x0.1 from step 20 on


def _targets(y):
    """0/1 labels in the official loaders' coding: -1 absent, 1 present."""
    return 2 * y - 1


# Tolerances, relative: a step's loss to torch's, a tensor's one-step update (L2 over the
# tensor) to torch's update of it, the momentum buffers after the last step to torch's. The
# torch step's own float32-vs-float64 difference in the same lockstep
# (`parity_steps.torch_lockstep_drift`: a float64 copy set to the float32 run's weights before
# each of these 30 steps, its buffers running on their own): losses 3.9e-7, updates 1.9e-3
# (parameters; a batch norm's scale whose momentum nearly cancels) and 9.8e-6 (running
# statistics), momentum buffers 9.6e-4. mlgraph against the float32 run: 7.2e-7, 1.4e-3,
# 8.2e-6, 9.6e-4.
TOL = {"loss": 1e-5, "params": 1e-2, "rest": 1e-4, "trace": 1e-2}


def _config(tmp_path):
    c = recipes.mlgcn(dataset="coco2014")
    c.image_size, c.batch_size, c.num_epochs = SIZE, B, float(EPOCHS)
    c.optimizer.milestones = (MILESTONE,)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "words.npy", rng.normal(size=(C, 12)).astype(np.float32))
    y = (rng.random((60, C)) < 0.4).astype(np.float32)
    y[:10, 0] = y[:10, 1] = 1  # a strong pair, so that gen_A has an edge
    np.save(tmp_path / "counts.npy", cooccurrence.counts_from_labels(y))
    c.model.update(backbone_kwargs={"layers": (1, 1, 1, 1), "width": 8}, hidden_dim=16)
    c.model.embed_path = str(tmp_path / "words.npy")
    c.model.graph_path = str(tmp_path / "counts.npy")
    return c


def _loop(model):
    return mlgcn_train.MLGCNLoop(model, mlgcn_train.Recipe(epoch_step=(MILESTONE,)))


def measure(config, mlgraph_changes=None, drift: bool = False) -> dict:
    """The lockstep run of `config` (`mlgraph_changes` alters mlgraph's side only):
    `run_lockstep`'s record with 'errors', the worst of each kind as {kind: (error, where)};
    with `drift`, `torch_lockstep_drift`'s under 'drift/<kind>' (the tolerances' measure)."""
    tm, (mod, graphdef, state, built), table = build_both(config, C, None, mlgraph_changes)
    images, labels = random_batches(BATCHES, B, SIZE, C, seed=1)
    found = {}
    if drift:
        found = torch_lockstep_drift(_loop, copy.deepcopy(tm), images, labels, EPOCHS, _targets)
    loop = _loop(tm)
    run = run_lockstep(loop, mod, graphdef, state, built, table, images, labels, EPOCHS, _targets)
    errors = {"loss": (max(run["loss"]), f"step {int(np.argmax(run['loss']))}")}
    for kind in ("params", "rest"):
        step = max(range(len(run[kind])), key=lambda i: run[kind][i][0])
        errors[kind] = (run[kind][step][0], f"step {step}: {run[kind][step][1]}")
    got = optimizer_slots(run["final"]["opt"])["trace"]
    buffers = optimizer_state(loop.optimizer, tm)
    want = to_mlgraph(table, buffers, field="momentum_buffer", paths=got)
    errors["trace"] = worst(relative_l2(got, want))
    errors.update({f"drift/{k}": v for k, v in found.items()})
    return dict(run, errors=errors)


def test_30_steps_follow_the_official_loop(tmp_path):
    run = measure(_config(tmp_path))
    # The run crosses what is to be checked: clipped and unclipped steps, both epoch
    # boundaries, the decay at the milestone epoch in both groups (backbone, gc1, gc2).
    norms = np.array(run["grad_norms"])
    assert len(norms) == BATCHES * EPOCHS
    assert (norms > 10).sum() >= 5 and (norms < 10).sum() >= 5, norms
    want = [[0.01, 0.1, 0.1]] * 2 * BATCHES + [[0.001, 0.01, 0.01]] * BATCHES
    np.testing.assert_allclose(run["lrs"], want, rtol=1e-12)
    np.testing.assert_allclose(run["lr"], np.array(want)[:, 1], rtol=1e-6)  # mlgraph's, reported
    for kind, (error, where) in run["errors"].items():
        assert error < TOL[kind], (kind, where, error)


def test_the_multistep_schedule_steps_at_epoch_starts_and_names_what_it_lacks():
    """engine.py's adjust_learning_rate: x0.1 from the first step of each listed epoch (a
    repeated epoch counts once), epochs being the run's total_steps / num_epochs steps."""
    opt = recipes.mlgcn(dataset="coco2014").optimizer
    opt.milestones = (1, 3, 3)
    lr = optim.learning_rate_fn(opt, total_steps=50, num_epochs=4.0)  # 12.5 steps an epoch
    got = [float(lr(s)) for s in (0, 12, 13, 37, 38, 49)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    with pytest.raises(ConfigError) as e:
        optim.learning_rate_fn(opt, total_steps=50)
    assert str(e.value) == (
        "config.optimizer.schedule='multistep' steps the rate at epochs: it needs "
        "config.optimizer.milestones (epochs) and step_gamma, and the run's num_epochs"
    )

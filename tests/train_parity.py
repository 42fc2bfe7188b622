"""The shuffled-epoch runs of the many-step training parity tests of Scob and the single-positive
baselines (tests/test_train_parity_{scob,spml}.py, issue 33): random images through the
config's evaluation transform, fresh permutations every epoch, mlgraph's real training (its
jitted step with the loop's shardings, and the method's epoch hook as the loop calls it), and
each figure a pair (mlgraph vs torch float32, torch float32 vs float64) checked against its
tolerance; the primitives are `torch_train_compare`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from torch_train_compare import (
    ADAM_SLOTS,
    flat,
    jit_train_step,
    max_relative_error,
    optimizer_slots,
    relative_l2,
    run_steps,
    to_mlgraph,
    torch_adam_slots,
)

from mlgraph import bench_torch, evaluation, sharding, train
from mlgraph.data import datasets, pipeline
from mlgraph.torch_reference.training import optimizer_state


def images_and_labels(n: int, size: int, num_classes: int, seed: int):
    """(the training source: n random RGB images [size, size, 3] uint8 with multi-hot labels,
    the labels [n, C], one observed positive per image [n, C])."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_classes)) < 0.35).astype(np.float32)
    labels[np.arange(n), rng.integers(0, num_classes, n)] = 1.0
    observed = np.zeros_like(labels)
    for i in range(n):
        observed[i, rng.choice(np.flatnonzero(labels[i]))] = 1.0
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    source = [{"image": pixels[i], "labels": labels[i]} for i in range(n)]
    return source, labels, observed


def normalised(source, config, num_classes: int) -> np.ndarray:
    """The source's images through the config's evaluation transform (at their own size:
    resizing is the identity), as the pseudo-labelling pass reads them."""
    transform = pipeline.EvalTransform.from_config(config, num_classes)
    return np.stack([transform.map(x)["image"] for x in source])


def shuffled_epochs(n: int, batch: int, epochs: int, seed: int) -> list[list[np.ndarray]]:
    """The rows of each batch, per epoch: a fresh permutation of the n rows cut into
    n // batch batches."""
    rng = np.random.default_rng(seed)
    return [
        [p[i : i + batch] for i in range(0, n - batch + 1, batch)]
        for p in (rng.permutation(n) for _ in range(epochs))
    ]


def run_mlgraph_as_loop(mod, graphdef, tx, state, config, training, images, labels, epochs):
    """mlgraph's training over the `shuffled_epochs` `epochs`: the method's step from
    `train_step.make_train_step` (the finite check included), jitted as `train.Loop` jits it
    (state replicated, batch sharded over the devices), and the method's `epoch_end` with the
    loop's `HookContext` after each epoch. Returns (the last state as numpy, the scalar
    metrics of every step)."""
    mesh = sharding.make_mesh()
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state = jax.device_put(state, repl)
    state_sh = jax.tree.map(lambda _: repl, state)
    total = sum(len(e) for e in epochs)
    shardings = {"in_shardings": (state_sh, data_sh), "out_shardings": (state_sh, repl)}
    step = jit_train_step(mod, graphdef, tx, config, total, **shardings)
    hooks = None
    if hasattr(mod, "epoch_end"):
        scorer = evaluation.Scorer(
            mod, config, graphdef, mesh, state, training.num_classes, evaluation.live
        )
        hooks = train.HookContext(
            config, mesh, training.source, training.num_classes, graphdef, scorer
        )

    def batch(rows):
        b = {"image": images[rows], "labels": labels[rows], "index": rows.astype(np.int32)}
        return jax.device_put(b, data_sh)

    records, done = [], 0
    for batches in epochs:
        state, metrics = run_steps(step, state, map(batch, batches))
        records += metrics
        done += len(batches)
        epoch = train.epochs_done(done, config.batch_size, training.num_examples)
        if hooks is not None and epoch > train.epochs_done(
            done - len(batches), config.batch_size, training.num_examples
        ):
            state = mod.epoch_end(hooks, state, epoch)
    return jax.device_get(state), records


@dataclasses.dataclass
class PairRun:
    """The common start of a shuffled-epoch parity and mlgraph's run from it.

    Attributes:
      tm: the torch model (float32) mlgraph's weights were converted from, untrained.
      table: the converter's table (mlgraph path -> (torch key, transform)).
      observed: the observed single positives [n, C] the torch trainers take.
      start: `tm`'s state in mlgraph's layout, float64.
      phi0: `tm`'s label matrix `g.logits` before training, float64.
      final: mlgraph's train state after the last step.
      records: mlgraph's scalar metrics of every step.
      images: the normalised images as a torch tensor [n, 3, H, W].
      batches: the same epochs for torch: per epoch [(images, row indices)].
    """

    tm: Any
    table: dict
    observed: np.ndarray
    start: dict[str, np.ndarray]
    phi0: np.ndarray
    final: dict
    records: list[dict[str, float]]
    images: Any
    batches: list


def build_pair_and_run_mlgraph(config, n: int, size: int, num_classes: int, epochs) -> PairRun:
    """`images_and_labels(n, size, num_classes, seed=0)` through `config`'s evaluation
    transform, `bench_torch.build_pair` of `config` on them (the torch model first, mlgraph's
    weights converted from it), and `run_mlgraph_as_loop` over `epochs` (`shuffled_epochs`'s
    rows)."""
    # Here, not at the top: the test modules import this one before their importorskip.
    import torch

    source, labels, observed = images_and_labels(n, size, num_classes, seed=0)
    training = datasets.TrainingSplit(source, num_classes, observed)
    images = normalised(source, config, num_classes)
    tm, (mod, graphdef, tx, state, config), method = bench_torch.build_pair(
        config, num_classes, training=training
    )
    table = bench_torch.converted(tm, method, config)[1]
    start = to_mlgraph(table, tm.state_dict(), dtype=np.float64)
    phi0 = tm.g.logits.detach().double().numpy()
    final, records = run_mlgraph_as_loop(
        mod, graphdef, tx, state, config, training, images, labels, epochs
    )
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    batches = [[(x[rows], torch.from_numpy(rows)) for rows in e] for e in epochs]
    return PairRun(tm, table, observed, start, phi0, final, records, x, batches)


def trained_state_figures(final, table: dict, start: dict, t32, t64) -> tuple[dict, dict, dict]:
    """The figures of the trained state after the last step, mlgraph's `final` train state
    against the float32 trainer `t32` (its `model` and `optimizer`) and that against the
    float64 `t64`, all as changes from the common `start` (mlgraph path -> float64 array):
    'params' and 'batch_stats' (the parameters' and the running statistics' updates), and
    'adam_mu', 'adam_nu' (Adam's moments; mlgraph's and torch's moments must cover the same
    parameters), each pooled `relative_l2`. Returns (the figures, mlgraph's
    `optimizer_slots`, torch float32's `optimizer_state`)."""
    s32, s64 = (to_mlgraph(table, t.model.state_dict(), dtype=np.float64) for t in (t32, t64))
    params, rest = flat(final["params"]), flat(final["rest"])
    p32, r32 = ({k: s32[k] for k in part} for part in (params, rest))
    figures = {
        "params": (
            relative_l2(params, s32, start, pooled=True),
            relative_l2(p32, s64, start, pooled=True),
        ),
        "batch_stats": (
            relative_l2(rest, s32, start, pooled=True),
            relative_l2(r32, s64, start, pooled=True),
        ),
    }
    mine = optimizer_slots(final["opt"])
    o32, o64 = (optimizer_state(t.optimizer, t.model) for t in (t32, t64))
    a32, a64 = (torch_adam_slots(table, o, dtype=np.float64) for o in (o32, o64))
    for slot in ADAM_SLOTS:
        assert set(a32[slot]) == set(mine[slot]), slot
        figures[f"adam_{slot}"] = (
            relative_l2(mine[slot], a32[slot], pooled=True),
            relative_l2(a32[slot], a64[slot], pooled=True),
        )
    return figures, mine, o32


def label_matrix_figures(final, phi0: np.ndarray, t32, t64, steps: int) -> tuple[tuple, tuple]:
    """The figures of the learnt label matrix (Scob's label estimator, ROLE's label matrix:
    mlgraph's `final["extra"]["phi"]`, torch's `model.g.logits`): (its update from `phi0`,
    its Adam's first moment), each (mlgraph vs torch float32, torch float32 vs float64) by
    `max_relative_error`. Its Adam must have taken `steps` steps on both sides."""
    key = "g.logits"
    phi32 = t32.model.g.logits.detach().double().numpy()
    phi64 = t64.model.g.logits.detach().numpy()
    update = (
        max_relative_error(final["extra"]["phi"] - phi0, phi32 - phi0),
        max_relative_error(phi32 - phi0, phi64 - phi0),
    )
    mine = optimizer_slots(final["extra"]["phi_opt"])
    o32, o64 = (optimizer_state(t.optimizer, t.model)[key] for t in (t32, t64))
    assert set(mine["count"].values()) == {int(o32["step"])} == {steps}
    mu32 = o32["exp_avg"]
    moment = (max_relative_error(mine["mu"][""], mu32), max_relative_error(mu32, o64["exp_avg"]))
    return update, moment


def check_figures(figures: dict[str, tuple[float, float]], tolerances: dict[str, float]) -> None:
    """Each figure (mlgraph vs torch float32, torch float32 vs float64) against its tolerance:
    mlgraph within it, and torch's own float32 drift within a third of it (the tolerance is
    at least three times the noise that float32 alone makes). One message lists them all."""
    table = ", ".join(
        f"{k} {got:.2e} (float32 drift {drift:.2e}, tolerance {tolerances[k]:.0e})"
        for k, (got, drift) in figures.items()
    )
    assert set(figures) == set(tolerances), table
    assert all(got <= tolerances[k] for k, (got, _) in figures.items()), table
    assert all(drift <= tolerances[k] / 3 for k, (_, drift) in figures.items()), table

"""The in-order fixed-batch runs of the many-step training parity tests of SSGRL, ML-GCN and
Query2Label (tests/test_train_parity_{ssgrl,mlgcn,q2l}.py): random batches, the same every
epoch, mlgraph's real train step run over them (`train_state.make_optimizer` and
`train_step.make_train_step` of a paper recipe's config), free (`measure_free`) or in lockstep
with the torch run (`run_lockstep`, for a recipe too chaotic at test size to follow freely),
and per-tensor comparisons with a transcribed official torch run
(`mlgraph.torch_reference.<method>_train`) through the method's converter table (mlgraph path
-> (torch key, transform)); the primitives are `torch_train_compare`'s.

Each comparison is `torch_train_compare.relative_l2`, relative to what training moved: for a
parameter, |mlgraph - torch| of the final values over |torch's change| of that tensor (L2 norms
over the tensor; so a weight that moved by 1e-3 is checked on its 1e-3, not on its own size);
the same for the running statistics' changes and the EMA's, and for the optimizer's moments over
their own norm. The float32 noise a tolerance must sit above is measured the same way, on a
float64 torch run (`measure_free(..., drift=True)`, `torch_lockstep_drift`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_train_compare import (
    flat,
    jit_train_step,
    optimizer_slots,
    path_name,
    relative_l2,
    run_steps,
    to_mlgraph,
    worst,
)

from mlgraph import bench_compile, bench_torch, config_lib, train_state
from mlgraph.torch_reference.training import optimizer_state

torch = pytest.importorskip("torch")


def random_batches(n: int, b: int, size: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` batches of random images and labels, fed in this order every epoch: (images [n, b,
    size, size, 3] float32, 0/1 labels [n, b, c]), every image with at least one label."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, b, size, size, 3)).astype(np.float32)
    labels = (rng.random((n, b, c)) < 0.4).astype(np.float32)
    labels[:, np.arange(b), np.arange(b) % c] = 1.0
    return images, labels


def torch_batches(images, labels, dtype=None, targets: Callable = lambda y: y) -> list:
    """The same batches for torch: [(images [B, 3, H, W], targets(labels))] in `dtype`."""
    dtype = dtype or torch.float32
    return [
        (
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dtype),
            torch.from_numpy(targets(y)).to(dtype),
        )
        for x, y in zip(images, labels, strict=True)
    ]


def build(
    config,
    num_classes: int,
    prepare: Callable | None = None,
    mlgraph_changes: Callable | None = None,
):
    """`bench_torch.build_pair` of `config`, the torch model first passed to `prepare` (e.g.
    rescaled) and its weights then converted into mlgraph's state again; `mlgraph_changes`
    (config -> None) alters mlgraph's copy of the config only, before its model is built (a
    deliberately wrong setting). Returns (torch model, (mod, graphdef, state, mlgraph's
    config), the converter's table)."""
    tm, side, method = bench_torch.build_pair(config, num_classes)
    built = side[4]
    if prepare is not None or mlgraph_changes is not None:
        if prepare is not None:
            prepare(tm)
        if mlgraph_changes is not None:
            built = copy.deepcopy(built)
            mlgraph_changes(built)
        training = bench_compile.synthetic_training(built.batch_size, num_classes)
        side = bench_torch.mlgraph_side(tm, method, built, num_classes, 1, training)
    mod, graphdef, _tx, state, built = side
    table = bench_torch.converted(tm, method, built)[1]
    return tm, (mod, graphdef, state, built), table


def _step(mod, graphdef, state, config, labels, epochs: int):
    """(state with a fresh optimizer state, jitted train step) for `epochs` passes over the
    batches of `labels` [n, B, C]: the optimizer made for the run's length
    (`config_lib.total_steps`), as training makes it."""
    n, b = labels.shape[:2]
    total = config_lib.total_steps(config, n * b)
    assert total == n * epochs, (total, n, epochs)
    tx = train_state.make_optimizer(mod, config, total, state["params"])
    state = dict(state, opt=tx.init(state["params"]))
    return state, jit_train_step(mod, graphdef, tx, config, total)


def _batch(x, y):
    return {"image": x, "labels": y, "index": np.arange(len(y), dtype=np.int32)}


def run_mlgraph_in_order(mod, graphdef, state, config, images, labels, epochs: int):
    """`epochs` passes of mlgraph's train step over the `random_batches` (in order, a fresh
    optimizer state); returns (losses, lrs, final state as numpy)."""
    state, step = _step(mod, graphdef, state, config, labels, epochs)
    batches = [_batch(x, y) for _ in range(epochs) for x, y in zip(images, labels, strict=True)]
    state, metrics = run_steps(step, state, batches)
    losses, lrs = (np.array([m[k] for m in metrics]) for k in ("loss", "lr"))
    return losses, lrs, jax.tree.map(np.asarray, state)


def with_torch_values(tree, table: dict, torch_state: dict):
    """`tree` (an nnx state) with every entry the table maps to a key of `torch_state` taken
    from it, in mlgraph's layout and the entry's dtype."""
    values = to_mlgraph(table, torch_state)

    def value(path, leaf):
        name = path_name(path)
        return jnp.asarray(values[name], leaf.dtype) if name in values else leaf

    return jax.tree_util.tree_map_with_path(value, tree)


def run_lockstep(loop, mod, graphdef, state, config, table, images, labels, epochs, targets):
    """mlgraph's train step beside the transcribed `loop` (its `start_epoch` and `step`) for
    `epochs` passes, mlgraph's parameters and running statistics set to torch's before every
    step while its optimizer state and step count run on their own (`targets` maps the 0/1
    labels to the loop's). Returns a dict: 'loss' (per-step relative loss errors), 'params'
    and 'rest' (per step, the worst `relative_l2` of mlgraph's update against torch's, with
    its path), 'grad_norms' (torch's, before clipping), 'lrs' (torch's groups' learning
    rates), 'lr' (mlgraph's) and 'final' (mlgraph's last state)."""
    state, step = _step(mod, graphdef, state, config, labels, epochs)
    batches = torch_batches(images, labels, targets=targets)
    out = {"loss": [], "params": [], "rest": [], "grad_norms": [], "lrs": [], "lr": []}
    for epoch in range(epochs):
        loop.start_epoch(epoch)
        for (x, y), (tx_, ty) in zip(zip(images, labels, strict=True), batches, strict=True):
            before = {k: v.detach().numpy().copy() for k, v in loop.model.state_dict().items()}
            state = dict(
                state,
                params=with_torch_values(state["params"], table, before),
                rest=with_torch_values(state["rest"], table, before),
            )
            state, metrics = step(state, _batch(x, y))
            out["lrs"].append([float(g["lr"]) for g in loop.optimizer.param_groups])
            out["lr"].append(float(metrics["lr"]))
            loss = float(loop.step(tx_, ty))
            out["grad_norms"].append(loop.grad_norm)
            out["loss"].append(abs(float(metrics["loss"]) - loss) / abs(loss))
            after = {k: v.detach().numpy() for k, v in loop.model.state_dict().items()}
            for kind in ("params", "rest"):
                got = flat(state[kind])
                want = to_mlgraph(table, after, paths=got)
                start = to_mlgraph(table, before, paths=got)
                out[kind].append(worst(relative_l2(got, want, start)))
    out["final"] = jax.tree.map(np.asarray, state)
    return out


def loss_error(got, want) -> tuple[float, str]:
    """The worst per-step relative loss error and its step."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    rel = np.abs(got - want) / np.abs(want)
    return float(rel.max()), f"step {int(rel.argmax())}"


def float64_copy(tm):
    """A float64 copy of the torch model (buffers included), for the drift measure."""
    return copy.deepcopy(tm).double()


def mlgraph_views(final: dict, slots) -> dict[str, dict[str, np.ndarray]]:
    """mlgraph's final train state as flat views by kind: 'params', 'rest', each optimizer
    slot of `slots` and 'ema' (the EMA's parameters)."""
    views = {"params": flat(final["params"]), "rest": flat(final["rest"])}
    found = optimizer_slots(final["opt"])
    views.update({slot: found[slot] for slot in slots})
    views["ema"] = flat(final["ema"]["params"])
    return views


def record_views(table: dict, record, paths, slots: dict[str, str]) -> dict:
    """A transcribed run's record as `mlgraph_views` has mlgraph's, in mlgraph's layout over
    `paths` (e.g. a float64 run's, to measure the float32 drift)."""
    views = {kind: to_mlgraph(table, record.state, paths=paths) for kind in ("params", "rest")}
    for slot, field in slots.items():
        views[slot] = to_mlgraph(table, record.optimizer, field=field, paths=paths)
    if record.ema is not None:
        views["ema"] = to_mlgraph(table, record.ema, paths=paths)
    return views


def compare(
    table: dict,
    start: dict,
    got: dict,
    record,
    slots: dict[str, str],
    skip: Callable[[str], bool] = lambda path: False,
) -> dict[str, tuple[float, str]]:
    """The worst relative error of each kind between a run's flat views `got` (`mlgraph_views` or
    `record_views`; `start`: mlgraph's initial train state) and the transcribed run `record`
    (a `TrainRun`), as {kind: (error, path)}: 'params' and 'rest' (what training
    changed), each optimizer slot of `slots` (mlgraph slot -> torch state key, e.g. {'mu':
    'exp_avg'}), and 'ema' (the EMA's change of the parameters torch trains) when the record
    has an EMA (over all trained parameters at once). Paths `skip` names are left out
    (noise-driven ones, each named by the caller). A parameter torch never stepped must have
    all-zero slots in `got`: its error is their largest entry."""
    params0, rest0 = flat(start["params"]), flat(start["rest"])
    out = {}
    for kind, s in (("params", params0), ("rest", rest0)):
        want = to_mlgraph(table, record.state, paths=[p for p in s if not skip(p)])
        out[kind] = worst(relative_l2(got[kind], want, s))
    stepped = {p for p in params0 if table.get(p, (None,))[0] in record.optimizer}
    for slot, field in slots.items():
        mine = {p: v for p, v in got[slot].items() if not skip(p)}
        want = to_mlgraph(table, record.optimizer, field=field, paths=mine)
        errors = relative_l2(mine, want)
        errors.update({p: float(np.abs(v).max()) for p, v in mine.items() if p not in want})
        out[slot] = worst(errors)
    if record.ema is not None:
        # Over all trained parameters at once: with decay 0.9997, 30 steps move the EMA by
        # about 1e-5, near float32's rounding of a value of 1 (6e-8 a step), so a single
        # tensor of large values (the label queries) is rounding-dominated in either run.
        trained = [p for p in params0 if p in stepped and not skip(p)]
        want = to_mlgraph(table, record.ema, paths=trained)
        error = relative_l2(got["ema"], want, params0, pooled=True)
        out["ema"] = (error, "all trained parameters")
    return out


def torch_lockstep_drift(make_loop, tm, images, labels, epochs: int, targets) -> dict:
    """The float32 noise `run_lockstep` sees: the transcribed loop (`make_loop(model)`) on the
    torch model in float32 beside a float64 copy whose weights and running statistics are set
    to the float32 model's before every step (its optimizer state running on its own).
    Returns the worst of each kind, {kind: (error, where)}: 'loss', 'params' and 'rest' (a
    step's update), 'buffers' (the optimizer's state after the last step, every entry)."""
    loop32, loop64 = make_loop(tm), make_loop(float64_copy(tm))
    b32 = torch_batches(images, labels, targets=targets)
    b64 = torch_batches(images, labels, torch.float64, targets)
    params = {n for n, _ in tm.named_parameters()}
    found = {"loss": [], "params": [], "rest": []}
    step = 0
    for epoch in range(epochs):
        loop32.start_epoch(epoch)
        loop64.start_epoch(epoch)
        for (x32, y32), (x64, y64) in zip(b32, b64, strict=True):
            loop64.model.load_state_dict(loop32.model.state_dict())
            before = {k: v.detach().double().numpy().copy() for k, v in tm.state_dict().items()}
            l32, l64 = float(loop32.step(x32, y32)), float(loop64.step(x64, y64))
            found["loss"].append((abs(l32 - l64) / abs(l64), f"step {step}"))
            a32 = {k: v.detach().double().numpy() for k, v in loop32.model.state_dict().items()}
            a64 = {k: v.detach().numpy() for k, v in loop64.model.state_dict().items()}
            for kind, keys in (("params", params), ("rest", set(a64) - params)):
                errors = relative_l2({k: a32[k] for k in keys}, a64, before)
                e, where = worst({k: v for k, v in errors.items() if np.isfinite(v)})
                found[kind].append((e, f"step {step}: {where}"))
            step += 1
    out = {kind: max(values) for kind, values in found.items()}
    s32 = optimizer_state(loop32.optimizer, loop32.model)
    s64 = optimizer_state(loop64.optimizer, loop64.model)
    errors = {
        f"{name}.{k}": relative_l2({0: v}, {0: s64[name][k]})[0]
        for name, entries in s32.items()
        for k, v in entries.items()
        if v.ndim
    }
    out["buffers"] = worst(errors)
    return out


def measure_free(
    train: Callable,
    config,
    num_classes: int,
    shape: tuple[int, int, int],
    epochs: int,
    slots: dict[str, str],
    skip: Callable[[str], bool] = lambda path: False,
    *,
    pair=None,
    mlgraph_changes: Callable | None = None,
    drift: bool = False,
) -> dict:
    """mlgraph's train step and a transcription (`train(model, batches, epochs)`, e.g.
    `ssgrl_train.train`) free running over the same fixed batches (`shape`: batches per epoch,
    batch, image side; seed 1) from the same weights (`pair`: `build`'s result for `config`,
    made here when None; `mlgraph_changes` alters mlgraph's side only). Returns {kind: (worst
    relative error, where)}: 'loss', 'lr' (mlgraph's reported rate against the first torch
    group's) and `compare`'s kinds, with torch's per-step rates under 'lrs'; with `drift`, the
    same of a float64 torch run against the float32 one under 'drift/<kind>' (the float32
    noise a tolerance must sit above)."""
    n, b, size = shape
    tm, (mod, graphdef, state, built), table = pair or build(
        config, num_classes, None, mlgraph_changes
    )
    images, labels = random_batches(n, b, size, num_classes, seed=1)
    losses, lrs, final = run_mlgraph_in_order(mod, graphdef, state, built, images, labels, epochs)
    tm64 = float64_copy(tm) if drift else None
    record = train(tm, torch_batches(images, labels), epochs)
    torch_lrs = [g[0] for g in record.lrs]
    errors = compare(table, state, mlgraph_views(final, slots), record, slots, skip)
    errors["loss"] = loss_error(losses, record.losses)
    errors["lr"] = loss_error(lrs, torch_lrs)
    if drift:
        record64 = train(tm64, torch_batches(images, labels, torch.float64), epochs)
        paths = [*flat(state["params"]), *flat(state["rest"])]
        views = record_views(table, record64, paths, slots)
        found = compare(table, state, views, record, slots, skip)
        found["loss"] = loss_error(record64.losses, record.losses)
        errors.update({f"drift/{k}": v for k, v in found.items()})
    return dict(errors, lrs=np.array(torch_lrs))

"""What every many-step training parity test (tests/test_train_parity_*.py) shares: mlgraph's
train state read entry by entry (`flat`, `optimizer_slots`), a transcribed torch run's values
brought into mlgraph's layout through the method's converter table (mlgraph path -> (torch
key, transform): `to_mlgraph`), mlgraph's jitted train step looped over batches (`run_steps`),
torch held to one thread (`torch_threads`; the `one_torch_thread` fixture of conftest.py), and
the two families of error metrics:

- largest-entry (max-abs) errors (`moved_error`, `max_relative_error`, `state_errors`,
  `moment_errors`), with which SALGL's and SigRL's tolerances were measured;
- L2 errors over a tensor, or pooled over many (`relative_l2`), with which SSGRL's, ML-GCN's,
  Query2Label's, Scob's and SPML's were.

Each test's tolerances hold for its own family only, so both stay. Weights and running
statistics are compared as *changes from the common start* (their updates): at the papers'
learning rates a weight moves by 1e-4 of itself, so the weights themselves would agree whether
or not the updates do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping

import jax
import numpy as np
import optax

from mlgraph import train_step
from mlgraph.convert import core

# mlgraph's optax Adam slot -> the field of torch's Adam state that holds the same moment.
ADAM_SLOTS = {"mu": "exp_avg", "nu": "exp_avg_sq"}


@contextlib.contextmanager
def torch_threads(n: int = 1, onednn: bool | None = None):
    """torch on `n` threads inside the block, and its oneDNN CPU kernels on or off when `onednn`
    is given; both restored after. The parity models are tiny: on a shared 2-core host, torch's
    threads beside XLA's only wait on each other (a 30-step run takes 30x longer)."""
    import torch

    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(n)
    if onednn is not None:
        torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn


def path_name(path) -> str:
    """A pytree path as the '/'-joined mlgraph path (the converter tables' keys): dict keys,
    sequence indices and attribute names, an nnx Variable's `value` attribute left out."""
    names = []
    for k in path:
        # Only the attribute: a module may well have a submodule called "value" (a dict key).
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        names.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(names)


def _masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def flat(tree) -> dict[str, np.ndarray]:
    """Every array of `tree` (an nnx State, a dict, an optax state) as numpy by its
    `path_name`; optax's MaskedNode placeholders (a parameter of another group) left out."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_masked)[0]
    return {path_name(p): np.asarray(v) for p, v in leaves if not _masked(v)}


_SLOT_STATES = (optax.ScaleByAdamState, optax.TraceState)


def optimizer_slots(opt_state) -> dict[str, dict]:
    """The per-parameter state of every Adam and SGD-momentum transformation in `opt_state`,
    over all its parameter groups (a multi-transform's, or a dict of groups'): {'mu': {parameter
    path: array}, 'nu': ..., 'trace': ... (SGD's momentum), 'count': {path of the group's Adam
    state: its step count}}. Found by the states' types, not their path names, so that a
    schedule's own counter (`inject_hyperparams`) is not taken for Adam's."""
    out: dict[str, dict] = {"mu": {}, "nu": {}, "trace": {}, "count": {}}
    is_slot = lambda x: isinstance(x, _SLOT_STATES) or _masked(x)  # noqa: E731
    for path, node in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_slot)[0]:
        if isinstance(node, optax.ScaleByAdamState):
            out["mu"] |= flat(node.mu)
            out["nu"] |= flat(node.nu)
            out["count"][path_name(path)] = int(node.count)
        elif isinstance(node, optax.TraceState):
            out["trace"] |= flat(node.trace)
    return out


def to_mlgraph(
    table: Mapping,
    values: Mapping,
    *,
    field: str | None = None,
    paths: Iterable[str] | None = None,
    skip: Collection[str] = (),
    dtype=None,
) -> dict[str, np.ndarray]:
    """{mlgraph path: transform(values[key])} through the converter `table` (mlgraph path ->
    (torch key, transform)) of torch `values` {torch key: tensor or array} (a state dict, a
    `TrainRun`'s state or EMA). With `field`, `values` is per-parameter optimizer state
    ({torch key: {field: array}}, `TrainRun.optimizer`) and that field is taken. Over `paths`
    (default: the whole table) less those in `skip`; a path whose key `values` lacks (a
    parameter without optimizer state, a buffer the converter does not read), or that the
    table lacks, is left out. The transform sees the values in their own precision, or
    converted to `dtype` first (e.g. float64, to compare a float32 run with a float64 one)."""
    if field is not None:
        values = {k: v[field] for k, v in values.items() if field in v}
    out = {}
    for path in table if paths is None else paths:
        if path in skip or path not in table:
            continue
        key, transform = table[path]
        if key not in values:
            continue
        value = core.to_numpy_state_dict({key: values[key]})[key]
        if dtype is not None:
            value = value.astype(dtype)
        out[path] = np.asarray(transform(value))
    return out


def torch_adam_slots(table: Mapping, optimizer: Mapping, **options) -> dict[str, dict]:
    """torch's Adam moments (`optimizer`: {torch key: its state}, `TrainRun.optimizer`) in
    mlgraph's layout, as `optimizer_slots` has mlgraph's: {'mu': {path: exp_avg}, 'nu': {path:
    exp_avg_sq}}; `options` as `to_mlgraph`'s."""
    return {
        slot: to_mlgraph(table, optimizer, field=field, **options)
        for slot, field in ADAM_SLOTS.items()
    }


def worst(errors: Mapping) -> tuple[float, object]:
    """(the largest error, its entry) of {entry: error}."""
    where = max(errors, key=errors.get)
    return errors[where], where


def jit_train_step(mod, graphdef, tx, config, total: int, **jit_kwargs):
    """mlgraph's real train step (`train_step.make_train_step`) for a run of `total` steps,
    jitted (`jit_kwargs`: e.g. the training loop's shardings)."""
    return jax.jit(train_step.make_train_step(mod, graphdef, tx, config, total), **jit_kwargs)


def run_steps(step, state, batches: Iterable) -> tuple[dict, list[dict[str, float]]]:
    """`step` (`jit_train_step`'s) from `state` over `batches`, in order. Returns (the last
    state, the scalar metrics of every step as floats)."""
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
    return state, metrics


def run_bench_side(side, total: int, state, batches) -> tuple[dict, list[dict[str, float]]]:
    """`run_steps` of the train step of `side` (`bench_torch.mlgraph_side`'s (mod, graphdef,
    tx, state, config)) for a run of `total` steps, from `state`."""
    mod, graphdef, tx, _, config = side
    return run_steps(jit_train_step(mod, graphdef, tx, config, total), state, batches)


# The largest-entry family.


def _ratio(err: float, scale: float) -> float:
    """err / scale; 0 for 0 / 0 and inf for a difference where the scale is 0."""
    if scale > 0:
        return err / scale
    return 0.0 if err == 0 else float("inf")


def moved_error(got, want, start) -> float:
    """max|got − want| as a share of how far the torch run moved the entry, max|want − start|
    (an entry's value hides its update: the update is what training computes), or of 1e-5 of
    the entry's scale (80 float32 steps) when it moved less than that: a frozen entry, or an
    EMA's constant buffer, which only rounds."""
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    moved = float(np.abs(np.asarray(want, np.float64) - start).max())
    floor = 1e-5 * float(np.abs(want).max())
    return _ratio(err, max(moved, floor))


def max_relative_error(got, want) -> float:
    """max|got − want| / max|want|, in float64 (0 for two zero arrays)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return _ratio(float(np.abs(got - want).max()), float(np.abs(want).max()))


def _same(_path, x):
    return x


def state_errors(got, entries, start, table, skip=(), view=_same) -> dict[str, float]:
    """`moved_error` of each entry of `got` (mlgraph's, by path) against the torch `entries`
    that began at `start`; `view(path, array)` picks the part of an entry compared."""
    want, begin = to_mlgraph(table, entries, skip=skip), to_mlgraph(table, start, skip=skip)
    return {path: moved_error(*(view(path, x[path]) for x in (got, want, begin))) for path in want}


def moment_errors(slots, optimizer, table, skip=(), view=_same) -> dict[str, float]:
    """`max_relative_error` of Adam's moments (`slots`: mlgraph's {'mu': {path: array}, 'nu':
    ...}, as `optimizer_slots` gives them) against torch's in `optimizer` (a
    `TrainRun.optimizer`), as {'<path> <slot>': error}."""
    errors = {}
    for slot, field in ADAM_SLOTS.items():
        for path, want in to_mlgraph(table, optimizer, field=field, skip=skip).items():
            mine = slots[slot][path]
            errors[f"{path} {slot}"] = max_relative_error(view(path, mine), view(path, want))
    return errors


# The L2 family.


def relative_l2(got: Mapping, want: Mapping, start: Mapping | None = None, *, pooled=False):
    """|got − want| / |want − start| (L2 norms, in float64) over the paths both `got` and `want`
    have, `start` None counting as 0: with `start`, the error of what training changed relative
    to torch's change. Per path {path: error} (inf where torch changed nothing and mlgraph
    did), or with `pooled` one figure over the entries of all those paths together, so that a
    few tensors whose updates are float noise (Adam steps every parameter by about its
    learning rate, whatever its gradient's size) weigh as little as they are many."""
    sums = {}
    for path, w in want.items():
        if path not in got:
            continue
        g, w = np.asarray(got[path], np.float64), np.asarray(w, np.float64)
        moved = w if start is None else w - np.asarray(start[path], np.float64)
        sums[path] = (float(np.sum((g - w) ** 2)), float(np.sum(moved**2)))
    if pooled:
        err, moved = (sum(x[i] for x in sums.values()) for i in (0, 1))
        return _ratio(err**0.5, moved**0.5)
    return {path: _ratio(e**0.5, m**0.5) for path, (e, m) in sums.items()}

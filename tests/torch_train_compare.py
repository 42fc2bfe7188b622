"""Reading mlgraph's train state entry by entry, to compare it after a run with a plain-torch
training transcription's `mlgraph.torch_reference.training.TrainRun` through the method's
converter table (mlgraph path -> (torch key, transform))."""

from __future__ import annotations

import jax
import numpy as np
import optax


def path_name(path) -> str:
    """A pytree path as the '/'-joined mlgraph path (an nnx Variable's `value` left out)."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        names.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(names)


def flat(tree) -> dict[str, np.ndarray]:
    """Every array of `tree` by its path (optax's MaskedNode placeholders left out)."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masked)[0]
    return {path_name(p): np.asarray(v) for p, v in leaves if not masked(v)}


def adam_state(opt_state) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], set[int]]:
    """(Adam's first moments, second moments by parameter path, the set of its step counts)
    from an optax state, however many parameter groups it holds."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    adams = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    mu, nu = {}, {}
    for a in adams:
        mu |= flat(a.mu)
        nu |= flat(a.nu)
    return mu, nu, {int(a.count) for a in adams}


def moved_error(got, want, start) -> float:
    """max|got − want| as a share of how far the torch run moved the entry, max|want − start|
    (an entry's value hides its update: the update is what training computes), or of 1e-5 of
    the entry's scale (80 float32 steps) when it moved less than that: a frozen entry, or an
    EMA's constant buffer, which only rounds."""
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    moved = float(np.abs(np.asarray(want, np.float64) - start).max())
    floor = 1e-5 * float(np.abs(want).max())
    if max(moved, floor) == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / max(moved, floor)


def scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """max|got − want| / max|want| (0 for two zero arrays)."""
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    scale = float(np.abs(want).max())
    return err / scale if scale else (0.0 if err == 0.0 else float("inf"))


def worst(errors: dict[str, float]) -> tuple[str, float]:
    """The entry with the largest error and that error."""
    name = max(errors, key=errors.get)
    return name, errors[name]


def _same(_path, x):
    return x


def from_torch(entries, table, field=None, skip=()) -> dict[str, np.ndarray]:
    """A torch run's `entries` by mlgraph path in mlgraph's layout (through the converter
    `table`, less the paths in `skip`): a state dict's arrays, or with `field` one optimizer
    state field of each parameter that has a state."""
    out = {}
    for path, (key, to_jax) in table.items():
        if path in skip:
            continue
        if field is None:
            out[path] = to_jax(entries[key])
        elif key in entries:
            out[path] = to_jax(entries[key][field])
    return out


def state_errors(got, entries, start, table, skip=(), view=_same) -> dict[str, float]:
    """`moved_error` of each entry of `got` (mlgraph's, by path) against the torch `entries`
    that began at `start`; `view(path, array)` picks the part of an entry compared."""
    want, begin = from_torch(entries, table, skip=skip), from_torch(start, table, skip=skip)
    return {path: moved_error(*(view(path, x[path]) for x in (got, want, begin))) for path in want}


def moment_errors(mu, nu, optimizer, table, skip=(), view=_same) -> dict[str, float]:
    """`scaled_error` of Adam's moments `mu`, `nu` (mlgraph's, by path) against torch's
    `exp_avg`, `exp_avg_sq` in `optimizer` (a `TrainRun.optimizer`)."""
    errors = {}
    for name, mine, field in (("mu", mu, "exp_avg"), ("nu", nu, "exp_avg_sq")):
        for path, want in from_torch(optimizer, table, field, skip).items():
            errors[f"{path} {name}"] = scaled_error(view(path, mine[path]), view(path, want))
    return errors


def run_mlgraph(side, total: int, state, batches) -> tuple[dict, list[dict[str, float]]]:
    """mlgraph's real train step (`train_step.make_train_step`) over `batches` from `state`;
    `side` is `bench_torch.mlgraph_side`'s (mod, graphdef, tx, state, config). Returns (the
    last state, the scalar metrics of every step)."""
    from mlgraph import train_step

    mod, graphdef, tx, _, config = side
    step = jax.jit(train_step.make_train_step(mod, graphdef, tx, config, total))
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
    return state, metrics

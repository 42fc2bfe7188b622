"""Divergence: non-finite losses and updates, caught inside the jitted step, read lazily.

Every step a method provides is wrapped (`guard_step`): from the step's returned loss and the
updated parameters (a non-finite gradient makes them non-finite through any optax update;
`train_step` reads them through the EMA's parameters, finite exactly where they are) it
computes one finite flag, on the device, and records the first bad step in the train state's
`health` entry. The host reads `health` only where it waits for the device anyway (a log line,
an epoch hook, an evaluation, a checkpoint), so the check costs no extra host sync, and a state
is checked before every save: no state past a non-finite step is ever written.

By default a non-finite step stops the run (`check` raises `DivergenceError`, one line with
the last good checkpoint); `config.optimizer.skip_nonfinite` instead keeps the state from before
such a step (its step count still advances) and counts the skipped updates
(`health["skipped"]`, logged as `train/skipped`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlgraph.errors import MlgraphError

HEALTH = "health"  # the train state's entry the guard keeps


class DivergenceError(MlgraphError):
    """Training or evaluation met non-finite values: the model diverged."""


def initial_health() -> dict[str, jax.Array]:
    """A run's `health` before its first step: nothing skipped, no bad step yet."""
    return {
        "skipped": jnp.zeros((), jnp.int32),  # updates skipped (skip_nonfinite)
        "bad_step": jnp.full((), -1, jnp.int32),  # the first non-finite step; -1 = none
        "bad_loss": jnp.zeros((), jnp.float32),  # its loss
    }


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (a scalar bool array)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else True


def guard_step(
    train_step: Callable,
    skip_nonfinite: bool,
    updated: Callable[[dict], Any] = lambda state: state["params"],
) -> Callable:
    """`train_step` (state, batch) -> (state, metrics) with the finite check around it.

    The method's step sees the state without `health`, as it always did. The step is finite
    when its `metrics["loss"]` and every updated parameter are, read in `updated(new state)`
    (the parameters, or a tree finite exactly where they are); the first step that is not is
    recorded in `health`. With `skip_nonfinite` such a step's new state is replaced by the old
    one (but for the step count) and `metrics["skipped"]` counts the skipped updates so far.
    """

    def guarded(state: dict, batch: dict):
        health = state[HEALTH]
        before = {k: v for k, v in state.items() if k != HEALTH}
        after, metrics = train_step(before, batch)
        loss = jnp.asarray(metrics["loss"], jnp.float32)
        finite = jnp.isfinite(loss) & all_finite(updated(after))
        first = (health["bad_step"] < 0) & ~finite
        health = {
            "skipped": health["skipped"] + (~finite).astype(jnp.int32) * int(skip_nonfinite),
            "bad_step": jnp.where(first, before["step"] + 1, health["bad_step"]),
            "bad_loss": jnp.where(first, loss, health["bad_loss"]),
        }
        if skip_nonfinite:
            step = after["step"]
            after = jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before)
            after["step"] = step
            metrics = dict(metrics, skipped=health["skipped"])
        return dict(after, **{HEALTH: health}), metrics

    return guarded


def check(state: dict, skip_nonfinite: bool, last_good: int | None) -> int:
    """Read `state["health"]` on the host; returns the number of skipped updates.

    Call it only where the host waits for the device anyway.

    Raises:
      DivergenceError: a step was non-finite and skipping is off: 'step N: loss is nan; last
        good checkpoint step M; ...' (what to do next).
    """
    health = jax.device_get(state[HEALTH])
    bad_step = int(health["bad_step"])
    if bad_step < 0 or skip_nonfinite:
        return int(health["skipped"])
    loss = float(health["bad_loss"])
    what = f"loss is {loss}" if not np.isfinite(loss) else f"the update is not finite (loss {loss})"
    kept = (
        f"last good checkpoint step {last_good}" if last_good is not None else "no checkpoint yet"
    )
    raise DivergenceError(
        f"step {bad_step}: {what}; {kept}; lower config.optimizer.lr in a "
        "new workdir, or run again with --config.optimizer.skip_nonfinite=True to skip such "
        "updates"
    )


def check_scores(scores: list[np.ndarray], names: list[str], where: str) -> None:
    """Evaluation scores must be finite (a diverged model's are not).

    Raises:
      DivergenceError: '{where}: N of M scores of the {name} are not finite: the model diverged'.
    """
    for s, name in zip(scores, names, strict=True):
        bad = int(np.size(s) - np.isfinite(s).sum())
        if bad:
            raise DivergenceError(
                f"{where}: {bad} of {np.size(s)} scores of the {name} are not finite "
                f"(e.g. {s[~np.isfinite(s)].flat[0]}): the model diverged; retrain from an "
                "earlier checkpoint with a lower config.optimizer.lr"
            )

"""What the transcribed official training loops (`ssgrl_train`, `mlgcn_train`, `q2l_train`)
share: the epoch/iteration driver and the record of a run (per-step losses and learning rates,
the final model state, optimizer state and EMA) that the many-step parity tests compare with
mlgraph's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mlgraph.torch_reference import require_torch

torch = require_torch()


@dataclasses.dataclass
class TrainRecord:
    """A transcribed run.

    Attributes:
      losses: the loss of every iteration, in order.
      lrs: the learning rate of each parameter group that every iteration's update used.
      state: `model.state_dict()` after the last iteration (parameters and buffers).
      optimizer: parameter name -> its optimizer state (e.g. Adam's `exp_avg`, `exp_avg_sq`,
        `step`; SGD's `momentum_buffer`); parameters torch never stepped have no entry.
      ema: the EMA model's `state_dict()`, or None for a recipe without one.
    """

    losses: list[float]
    lrs: list[list[float]]
    state: dict[str, np.ndarray]
    optimizer: dict[str, dict[str, np.ndarray]]
    ema: dict[str, np.ndarray] | None


class OfficialLoop(Protocol):
    """One method's transcribed loop: `start_epoch(epoch)` does what the official code does
    before an epoch's first batch (mode switches, per-epoch learning-rate changes);
    `step(images, targets)` one iteration, returning the loss."""

    model: Any
    optimizer: Any
    ema: Any

    def start_epoch(self, epoch: int) -> None: ...

    def step(self, images, targets): ...


def numpy_state(module) -> dict[str, np.ndarray]:
    """`module.state_dict()` as numpy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def named_optimizer_state(model, optimizer) -> dict[str, dict[str, np.ndarray]]:
    """`optimizer.state` keyed by the parameters' names in `model`, as numpy copies."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {k: np.asarray(v.detach().cpu()) if torch.is_tensor(v) else np.asarray(v)
                       for k, v in entries.items()}
        for p, entries in optimizer.state.items()
    }  # fmt: skip


def run(loop: OfficialLoop, batches: Sequence[tuple[Any, Any]], epochs: int) -> TrainRecord:
    """`epochs` passes of `loop` over `batches` ((images, targets) pairs, the same order every
    epoch, as a fixed-batch test feeds them), recorded."""
    losses, lrs = [], []
    for epoch in range(epochs):
        loop.start_epoch(epoch)
        for images, targets in batches:
            lrs.append([float(g["lr"]) for g in loop.optimizer.param_groups])
            losses.append(float(loop.step(images, targets)))
    ema = None if loop.ema is None else numpy_state(loop.ema)
    return TrainRecord(
        losses=losses,
        lrs=lrs,
        state=numpy_state(loop.model),
        optimizer=named_optimizer_state(loop.model, loop.optimizer),
        ema=ema,
    )

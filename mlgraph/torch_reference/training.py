"""What the plain-torch training transcriptions (`ssgrl_train`, `mlgcn_train`, `q2l_train`,
`salgl_train`, `sigrl_train`) share: the record of a run (the loss of every iteration, the
learning rates it used, and after the last step the model's state, the optimizer's state and
the EMA's state, all as numpy arrays keyed by the torch names, so that a test compares them
with mlgraph's through the method's converter table), the epoch/iteration driver of the
loops with a `start_epoch`/`step` interface, and the `ModelEma` Query2Label's and SALGL's
code both keep."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mlgraph.torch_reference import require_torch

torch = require_torch()


@dataclasses.dataclass
class TrainRun:
    """The record of a transcribed training run.

    Attributes:
      losses: the loss of each iteration, NaN where the official loop skipped the iteration
        (SigRL: a batch without any image with a seen positive).
      lrs: per iteration, the learning rate its update used: SALGL's and SigRL's base rate
        (before a group's scale), the other loops' rate of each parameter group (a list).
      state: `model.state_dict()` after the last step (parameters and buffers).
      optimizer: per parameter name, torch's optimizer state (Adam's `exp_avg`, `exp_avg_sq`,
        `step`; SGD's `momentum_buffer`); parameters that never got a gradient have none.
      ema: the EMA model's `state_dict()`, or None where the official loop keeps no EMA.
    """

    losses: list[float]
    lrs: list
    state: dict[str, np.ndarray]
    optimizer: dict[str, dict[str, np.ndarray]]
    ema: dict[str, np.ndarray] | None


def numpy_state(module) -> dict[str, np.ndarray]:
    """`module.state_dict()` as numpy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def optimizer_state(optimizer, model) -> dict[str, dict[str, np.ndarray]]:
    """torch's per-parameter optimizer state by the parameter's name in `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, s in optimizer.state.items():
        if s:
            out[names[id(p)]] = {
                k: (v.detach().cpu().numpy().copy() if torch.is_tensor(v) else np.asarray(v))
                for k, v in s.items()
            }
    return out


class ModelEma:
    """Query2Label's `main_mlc.py` and SALGL's `lib/utils.py` `ModelEma`: a deep copy of the
    model in eval mode; `update` moves every `state_dict` entry to
    decay * ema + (1 - decay) * model."""

    def __init__(self, model, decay: float):
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay

    def update(self, model) -> None:
        """One EMA step toward `model`."""
        with torch.no_grad():
            for e, m in zip(
                self.module.state_dict().values(), model.state_dict().values(), strict=True
            ):
                e.copy_(self.decay * e + (1.0 - self.decay) * m)

    def state_dict(self):
        """The EMA model's state dict."""
        return self.module.state_dict()


class OfficialLoop(Protocol):
    """One method's transcribed loop: `start_epoch(epoch)` does what the official code does
    before an epoch's first batch (mode switches, per-epoch learning-rate changes);
    `step(images, targets)` one iteration, returning the loss."""

    model: Any
    optimizer: Any
    ema: Any

    def start_epoch(self, epoch: int) -> None: ...

    def step(self, images, targets): ...


def run(loop: OfficialLoop, batches: Sequence[tuple[Any, Any]], epochs: int) -> TrainRun:
    """`epochs` passes of `loop` over `batches` ((images, targets) pairs, the same order every
    epoch, as a fixed-batch test feeds them), recorded (`lrs`: each group's rate)."""
    losses, lrs = [], []
    for epoch in range(epochs):
        loop.start_epoch(epoch)
        for images, targets in batches:
            lrs.append([float(g["lr"]) for g in loop.optimizer.param_groups])
            losses.append(float(loop.step(images, targets)))
    ema = None if loop.ema is None else numpy_state(loop.ema)
    return TrainRun(
        losses=losses,
        lrs=lrs,
        state=numpy_state(loop.model),
        optimizer=optimizer_state(loop.optimizer, loop.model),
        ema=ema,
    )

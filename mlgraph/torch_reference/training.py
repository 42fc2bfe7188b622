"""What a plain-torch training transcription (`sigrl_train`, `salgl_train`) hands back: the
loss of every iteration, the learning rates it used, and after the last step the model's
state, the optimizer's state and the EMA's state, all as numpy arrays keyed by the torch names,
so that a test compares them with mlgraph's through the method's converter table."""

from __future__ import annotations

import dataclasses

import numpy as np

from mlgraph.torch_reference import require_torch

torch = require_torch()


@dataclasses.dataclass
class TrainRun:
    """The record of a transcribed training run.

    Attributes:
      losses: the loss of each iteration, NaN where the official loop skipped the iteration
        (SigRL: a batch without any image with a seen positive).
      lrs: the base learning rate each iteration used (before a group's scale).
      state: `model.state_dict()` after the last step (parameters and buffers).
      optimizer: per parameter name, torch's Adam state (`exp_avg`, `exp_avg_sq`, `step`);
        parameters that never got a gradient have none.
      ema: the EMA model's `state_dict()`, or None where the official loop keeps no EMA.
    """

    losses: list[float]
    lrs: list[float]
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

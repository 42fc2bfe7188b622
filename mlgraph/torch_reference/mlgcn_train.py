"""ML-GCN's released training loop (megvii-research/ML-GCN `demo_coco_gcn.py` + `engine.py`'s
`Engine` and `GCNMultiLabelMAPEngine`; docs/ssgrl_mlgcn.md §3.1) in plain torch, in the official
order of operations.

Before training (`main_coco`): `MultiLabelSoftMarginLoss`; `torch.optim.SGD` over
`model.get_config_optim(lr, lrp)` (the backbone `features` at lr x lrp, `gc1` and `gc2` at lr;
`A` in no group) with momentum and weight decay on every grouped parameter, batch norms
included. Defaults of `demo_coco_gcn.py`: lr 0.1, lrp 0.1, momentum 0.9, weight decay 1e-4,
`--epoch_step` [30], 20 epochs.

Each epoch (`Engine.learning`): `adjust_learning_rate` multiplies every group's current rate by
0.1 when the epoch (counted from 0) is in `epoch_step` (once, however often it is listed), then
`model.train()`. Each batch: `on_start_batch` recodes the targets (the loaders' -1 / 0
'difficult' / 1 become 0 / 1 / 1), `on_forward` runs the forward, the loss, `zero_grad`,
`backward`, `clip_grad_norm(model.parameters(), max_norm=10.0)` (hard-coded) and `step`. No EMA,
no warm-up.

The official code ran on PyTorch 0.3.1, whose SGD and gradient clipping compute what today's
do (clip factor max_norm / (norm + 1e-6) when below 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.training import TrainRun, run

torch = require_torch()
nn = torch.nn


@dataclasses.dataclass(frozen=True)
class Recipe:
    """`demo_coco_gcn.py`'s argparse defaults and `engine.py`'s hard-coded settings."""

    lr: float = 0.1  # --lr
    lrp: float = 0.1  # --lrp: the backbone's share of lr
    momentum: float = 0.9  # --momentum
    weight_decay: float = 1e-4  # --weight-decay
    epoch_step: tuple[int, ...] = (30,)  # --epoch_step: epochs whose start multiplies lr by 0.1
    decay: float = 0.1  # adjust_learning_rate's factor
    max_norm: float = 10.0  # on_forward's clip_grad_norm


class MLGCNLoop:
    """The official loop over a `mlgraph.torch_reference.mlgcn.TorchMLGCN`."""

    def __init__(self, model, recipe: Recipe = Recipe()):
        self.model = model
        self.recipe = recipe
        self.criterion = nn.MultiLabelSoftMarginLoss()
        self.optimizer = torch.optim.SGD(
            model.get_config_optim(recipe.lr, recipe.lrp),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
        self.ema = None
        self.grad_norm = float("nan")  # the last iteration's gradient norm, before clipping

    def start_epoch(self, epoch: int) -> None:
        """`adjust_learning_rate` (x decay when `epoch` is in epoch_step), then train mode."""
        decay = self.recipe.decay if epoch in self.recipe.epoch_step else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * decay
        self.model.train()

    def step(self, images, targets):
        """One iteration on official targets (-1 absent, 0 difficult, 1 present): recode,
        forward, loss, zero_grad, backward, clip to max_norm, SGD; returns the loss."""
        target = targets.clone()
        target[target == 0] = 1
        target[target == -1] = 0
        output = self.model(images)
        loss = self.criterion(output, target.to(output.dtype))
        self.optimizer.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.recipe.max_norm)
        self.grad_norm = float(norm)
        self.optimizer.step()
        return loss.detach()


def train(
    model, batches: Sequence[tuple[Any, Any]], epochs: int, recipe: Recipe = Recipe()
) -> TrainRun:
    """`epochs` official epochs of `model` over `batches` ((images [B, 3, H, W], targets [B, C]
    in the loaders' -1 / 0 / 1 coding) pairs, in this order every epoch), recorded; `model` is
    trained in place."""
    return run(MLGCNLoop(model, recipe), batches, epochs)

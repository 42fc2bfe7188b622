"""SSGRL's released training loop (HCPLab-SYSU/SSGRL `main.py`, `main_coco.sh`;
docs/ssgrl_mlgcn.md §1.7) in plain torch, in the official order of operations.

Before training (`main`): every backbone parameter gets `requires_grad=False`, then layer4's
`True`; the optimizer is `torch.optim.Adam` over the parameters with a gradient at `--lr`
(main_coco.sh: 1e-5) with torch's default betas and eps: `--momentum` and `--weight-decay` are
parsed but never passed, and `--step_epoch` (1516541) is never read, so the rate is constant.
The loss is `BCEWithLogitsLoss` (mean).

Each epoch (`train`): `model.train()`, then `model.resnet_101.eval()` and
`model.resnet_101.layer4.train()` (layer4's batch norms use and update batch statistics, the
rest of the backbone keeps its running ones). Each batch: forward, loss, `zero_grad`,
`backward`, `step`. No EMA, no gradient clipping, no warm-up.

The official code ran on PyTorch 0.4.1, whose Adam added eps to sqrt(v) before the bias
correction; this transcription runs today's `torch.optim.Adam`, the formula mlgraph's optax
Adam has too.
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
    """The settings main_coco.sh passes that reach the loop (the same for VOC and VG)."""

    lr: float = 1e-5  # --learning-rate


class SSGRLLoop:
    """The official loop over a `mlgraph.torch_reference.ssgrl.TorchSSGRL` (official names:
    `resnet_101`, its `layer4`)."""

    def __init__(self, model, recipe: Recipe = Recipe()):
        self.model = model
        self.criterion = nn.BCEWithLogitsLoss()
        for p in model.resnet_101.parameters():
            p.requires_grad = False
        for p in model.resnet_101.layer4.parameters():
            p.requires_grad = True
        self.optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=recipe.lr
        )
        self.ema = None

    def start_epoch(self, epoch: int) -> None:
        """`train`'s mode switch: the model in train mode, its backbone in eval mode but for
        layer4."""
        del epoch
        self.model.train()
        self.model.resnet_101.eval()
        self.model.resnet_101.layer4.train()

    def step(self, images, targets):
        """One iteration: forward, BCE, zero_grad, backward, Adam; returns the loss."""
        output = self.model(images)
        loss = self.criterion(output, targets.to(output.dtype))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def train(
    model, batches: Sequence[tuple[Any, Any]], epochs: int, recipe: Recipe = Recipe()
) -> TrainRun:
    """`epochs` official epochs of `model` over `batches` ((images [B, 3, H, W], 0/1 targets
    [B, C]) pairs, in this order every epoch), recorded; `model` is trained in place."""
    return run(SSGRLLoop(model, recipe), batches, epochs)

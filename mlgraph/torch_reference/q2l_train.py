"""Query2Label's released training loop (SlongLiu/query2labels `main_mlc.py`, the README's R101
command; docs/ssgrl_mlgcn.md §4.1) in plain torch, in the official order of operations.

Before training (`main_worker`, `BackboneBase`): every backbone parameter whose name lacks
layer2, layer3 and layer4 gets `requires_grad=False` (the batch norms are FrozenBatchNorm2d,
buffers); `ModelEma(model, 0.9997)`; `AsymmetricLossOptimized` (README: gamma- 2, gamma+ 0,
`--dtgfl`; `--loss_clip` 0, `--eps` 1e-5); `torch.optim.AdamW` over the parameters with a
gradient, one group, at lr x batch/256, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2 on every
one (biases and norms included); `OneCycleLR(max_lr=lr, steps_per_epoch=len(train_loader),
epochs, pct_start=0.2)`, which replaces that rate by max_lr/25 at once, anneals it by cosine to
max_lr over the first 20 % of the steps and down to max_lr/25/1e4 after, and cycles beta1
between 0.95 and 0.85 against it.

Each epoch: at `epoch == ema_epoch` (0) the EMA is made afresh from the model, then `train`:
`model.train()`; each batch: forward, ASL, `zero_grad`, `backward`, the optimizer step (through
the AMP scaler, off here: float32 on CPU), `scheduler.step()` (per iteration), and, from
`ema_epoch` on, the EMA update decay * ema + (1 - decay) * model of every `state_dict` entry
(buffers included). No gradient clipping; the train loader drops its last partial batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mlgraph.torch_reference import losses, require_torch
from mlgraph.torch_reference.training import ModelEma, TrainRun, run

torch = require_torch()

TRAINED_STAGES = ("layer2", "layer3", "layer4")  # BackboneBase's names with a gradient


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The README's R101 command and `main_mlc.py`'s defaults that reach the loop."""

    lr: float = 1e-4  # --lr: OneCycleLR's max_lr
    weight_decay: float = 1e-2  # --weight-decay
    batch_size: int = 128  # -b (lr_mult = batch/256 only sets AdamW's rate OneCycleLR replaces)
    pct_start: float = 0.2  # OneCycleLR's, hard-coded
    ema_decay: float = 0.9997  # --ema-decay
    ema_epoch: int = 0  # --ema-epoch
    gamma_neg: float = 2.0  # --gamma_neg
    gamma_pos: float = 0.0  # --gamma_pos
    clip: float = 0.0  # --loss_clip
    eps: float = 1e-5  # --eps


class Q2LLoop:
    """The official loop over a `mlgraph.torch_reference.q2l.TorchQ2L` built with FrozenBatchNorm2d,
    for a run of `epochs` epochs of `steps_per_epoch` iterations (OneCycleLR's length)."""

    def __init__(self, model, steps_per_epoch: int, epochs: int, recipe: Recipe = Recipe()):
        self.model = model
        self.recipe = recipe
        for name, p in model.backbone[0].body.named_parameters():
            if not any(stage in name for stage in TRAINED_STAGES):
                p.requires_grad_(False)
        self.ema = ModelEma(model, recipe.ema_decay)
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for _, p in model.named_parameters() if p.requires_grad]}],
            recipe.batch_size / 256 * recipe.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=recipe.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=recipe.lr,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            pct_start=recipe.pct_start,
        )
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        """The EMA made afresh at `ema_epoch`, then train mode."""
        self.epoch = epoch
        if epoch == self.recipe.ema_epoch:
            self.ema = ModelEma(self.model, self.recipe.ema_decay)
        self.model.train()

    def step(self, images, targets):
        """One iteration: forward, ASL, zero_grad, backward, AdamW, OneCycleLR, EMA; returns
        the loss."""
        r = self.recipe
        output = self.model(images)
        loss = losses.asl(
            output, targets.to(output.dtype), r.gamma_pos, r.gamma_neg, clip=r.clip, eps=r.eps
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.epoch >= r.ema_epoch:
            self.ema.update(self.model)
        return loss.detach()


def train(
    model, batches: Sequence[tuple[Any, Any]], epochs: int, recipe: Recipe = Recipe()
) -> TrainRun:
    """`epochs` official epochs of `model` over `batches` ((images [B, 3, H, W], 0/1 targets
    [B, C]) pairs, in this order every epoch; OneCycleLR spans them all), recorded; `model` is
    trained in place."""
    return run(Q2LLoop(model, len(batches), epochs, recipe), batches, epochs)

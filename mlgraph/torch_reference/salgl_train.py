"""SALGL's training loop in plain torch. SALGL ships no training script (jasonseu/SALGL#1: the
author never released it), so this follows the paper's settings (Zhu et al., ICCV 2023,
"Scene-Aware Label Graph Learning for Multi-Label Image Classification", the implementation
details of its experiments as docs/salgl.md §2-§3.3 records them: 448 px, 80 epochs, ASL with
γ+ = 0 and γ− = 2, the scene entropy terms, three graph steps) with the optimizer, schedule,
EMA and loss helpers the official
repository does release (`lib/utils.py`: `get_args` defaults, `get_optimizer`,
`get_lr_scheduler`, `get_loss_fn`, `ModelEma`), run in the order of the author's sibling
trainer that shares that code (`jasonseu/CoCo`, `train.py`, `Trainer.train`):

    AdamW(model.parameters(), lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2 on
      every parameter); OneCycleLR(max_lr 1e-4, epochs x steps_per_epoch, pct_start 0.2;
      torch's cosine anneal, div_factor 25, final_div_factor 1e4, and beta1 cycled
      0.95 -> 0.85 -> 0.95); ModelEma(decay 0.9997, comat_ema True) copied before the first
      step.
    per epoch: model.train(); per batch:
      ret = model(images, targets)      # the co-occurrence counts take the batch first
      loss = ASL(ret.logits, targets) + lamda (ret.sample_en + ret.batch_en)   (lamda 1)
      optimizer.zero_grad(); loss.backward(); optimizer.step()
      lr_scheduler.step()               # per iteration
      ema.update(model)                 # every state_dict entry, counts included

No AMP and one process (the official DDP all-gathers the counts, which one process does not
need); the per-epoch validation changes nothing and is left out.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence

from mlgraph.torch_reference import require_torch, training
from mlgraph.torch_reference.losses import classification
from mlgraph.torch_reference.training import TrainRun, numpy_state, optimizer_state

torch = require_torch()


@dataclasses.dataclass(frozen=True)
class Args:
    """The `get_args` fields training reads, with the official defaults (`max_epochs` 80,
    `pct_start` 0.2, `ema_decay` 0.9997, `comat_ema` on, ASL γ+ 0, γ− 2, clip 0; `lamda` 1, the
    scene terms' weight)."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_epochs: int = 80
    pct_start: float = 0.2
    ema_decay: float = 0.9997
    comat_ema: bool = True
    gamma_pos: float = 0.0
    gamma_neg: float = 2.0
    clip: float = 0.0
    lamda: float = 1.0


class ModelEma(training.ModelEma):
    """SALGL's `lib/utils.ModelEma`: Query2Label's, and with `comat_ema` off the copy takes
    the live co-occurrence counts instead of their average."""

    def __init__(self, model, decay: float = 0.9997, comat_ema: bool = False):
        super().__init__(model, decay)
        self.comat_ema = comat_ema

    def update(self, model) -> None:
        """One EMA step from `model`."""
        super().update(model)
        if not self.comat_ema:
            self.module.comatrix = model.comatrix


class Trainer:
    """The optimizer, scheduler, EMA and loss of the loop above around `model`, stepped one
    batch at a time (`step`), `steps_per_epoch` iterations an epoch."""

    def __init__(self, model, steps_per_epoch: int, args: Args = Args()):
        self.model, self.args = model, args
        self.ema = ModelEma(model, decay=args.ema_decay, comat_ema=args.comat_ema)
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=args.lr,
            betas=(0.9, 0.999),
            eps=1e-08,
            weight_decay=args.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=args.lr,
            steps_per_epoch=steps_per_epoch,
            epochs=args.max_epochs,
            pct_start=args.pct_start,
        )
        # `get_loss_fn`'s AsymmetricLossOptimized(eps 1e-5, disable_torch_grad_focal_loss).
        self.loss_cfg = types.SimpleNamespace(
            name="asl", gamma_pos=args.gamma_pos, gamma_neg=args.gamma_neg, clip=args.clip,
            eps=1e-5,
        )  # fmt: skip

    def step(self, images, targets) -> float:
        """One iteration on images [B, 3, H, W] and 0/1 targets [B, C]; returns the loss."""
        ret = self.model(images, targets)
        cls = classification(ret["logits"], targets, self.loss_cfg)
        loss = cls + self.args.lamda * (ret["sample_en"] + ret["batch_en"])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.model)
        return loss.item()


def run(model, epochs: Sequence[Sequence[tuple]], args: Args = Args()) -> TrainRun:
    """The loop over `epochs` (per epoch, its (images, targets) batches in order; every epoch
    as long) from `model`'s current weights.

    Raises:
      ValueError: not one list of batches per epoch of `args.max_epochs`, or epochs of
        different lengths.
    """
    if len(epochs) != args.max_epochs or len({len(e) for e in epochs}) != 1:
        raise ValueError(
            f"{len(epochs)} epochs of {sorted({len(e) for e in epochs})} batches given; "
            f"args.max_epochs={args.max_epochs}, every epoch as long"
        )
    trainer = Trainer(model, len(epochs[0]), args)
    losses, lrs = [], []
    for batches in epochs:
        model.train()
        for images, targets in batches:
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            losses.append(trainer.step(images, targets))
    ema = numpy_state(trainer.ema.module)
    return TrainRun(losses, lrs, numpy_state(model), optimizer_state(trainer.optimizer, model), ema)

"""SigRL's open-vocabulary training loop in plain torch, in the official order of operations:
`OV/train_nus.py` (`main`: the optimizer, then per epoch `model.train()` and `train`) and
`OV/engine_nus.py` (`train`), with MKT's `util/optimizer.py` (`build_optimizer`),
`util/lr_decay.py` (`param_groups_lrd`, `get_layer_id_for_clip`) and `util/lr_sched.py`
(`adjust_learning_rate`), which SigRL ships byte-identical (docs/sigrl.md §1, §3).

Per iteration i of epoch e (N batches an epoch, the loader keeps its last partial batch):

1. every group's lr = lr(e + i / N) x its `lr_scale`: linear warm-up from 0 over
   `warmup_epochs`, then a half cosine from `lr` to `min_lr` at `epochs` (fractional epochs);
2. `zero_grad`; images without a positive seen label are dropped from the batch, and an empty
   batch is skipped (no optimizer step; the next iteration sets its own lr);
3. the student's forward over the seen labels' embeddings (`label_emb[:925]`), BiAM's ranking
   loss on the fused score against the ±1 labels (0 = ignored), the frozen CLIP teacher's
   `encode_image` CLS embedding without gradient, L1 between the student's CLS embedding and
   it; loss = distillation + ranking (weights 1, hard-coded);
4. backward, `optimizer.step()` (torch AdamW, betas (0.9, 0.999), eps 1e-8, each group's own
   decoupled weight decay). No gradient clipping, no EMA, no AMP.

Parameter groups (`param_groups_lrd`): BEiT-style layer ids for CLIP names (conv1,
class/positional embeddings, ln_pre: 0; `transformer.resblocks.i`: i + 1; everything else:
`transformer.layers` + 1), lr scale `layer_decay ** (layers + 1 - id)`; only ids above
`fix_layer` are optimized, every other parameter gets `requires_grad = False` after the
optimizer is built; weight decay on parameters with more than one dimension, none on vectors.
The teacher is a second, independent load of the same CLIP weights in eval mode (here a copy
of the student taken before the first step; the official one is float16 on a GPU, float32 here).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.sigrl import ranking_lossT
from mlgraph.torch_reference.training import TrainRun, numpy_state, optimizer_state

torch = require_torch()
F = torch.nn.functional


@dataclasses.dataclass(frozen=True)
class Args:
    """The arguments of `OV/train_nus.py` that training reads, with its defaults."""

    epochs: int = 20
    warmup_epochs: float = 2
    lr: float = 1e-4
    min_lr: float = 1e-7
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    fix_layer: int = 10
    num_seen: int = 925  # `label_emb[:925]`: NUS-WIDE's seen tags come first


def get_layer_id_for_clip(name: str, num_layers: int) -> int:
    """MKT's `get_layer_id_for_clip`: the BEiT-style layer id of a CLIPVIT parameter name."""
    if name in ("cls_token", "pos_embed", "class_embedding"):
        return 0
    if name.startswith(("patch_embed", "conv1", "ln_pre", "positional_embedding")):
        return 0
    if name.startswith("transformer.resblocks"):
        return int(name.split(".")[2]) + 1
    return num_layers


def param_groups_lrd(model, fix_layer: int, weight_decay: float, layer_decay: float):
    """MKT's `param_groups_lrd`: (torch param groups, their parameter names), one group per
    layer id above `fix_layer` and decay kind, each with its `lr_scale` and `weight_decay`."""
    num_layers = model.transformer.layers + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups, names = {}, {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = "no_decay" if p.ndim == 1 else "decay"
        this_decay = 0.0 if p.ndim == 1 else weight_decay
        layer_id = get_layer_id_for_clip(n, num_layers)
        if layer_id > fix_layer:
            group = f"layer_{layer_id}_{decay}"
            if group not in groups:
                scale = layer_scales[layer_id]
                groups[group] = {"lr_scale": scale, "weight_decay": this_decay, "params": []}
                names[group] = {"lr_scale": scale, "weight_decay": this_decay, "params": []}
            groups[group]["params"].append(p)
            names[group]["params"].append(n)
    return list(groups.values()), names


def build_optimizer(args: Args, model):
    """MKT's `build_optimizer`: AdamW over the layer-decay groups (torch's default betas and
    eps; each group's own weight decay), then `requires_grad = False` on the parameters of no
    group."""
    params, group_names = param_groups_lrd(
        model, args.fix_layer, args.weight_decay, layer_decay=args.layer_decay
    )
    trained = {n for g in group_names.values() for n in g["params"]}
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    for name, param in model.named_parameters():
        if name not in trained:
            param.requires_grad = False
    return optimizer


def adjust_learning_rate(optimizer, epoch: float, args: Args) -> float:
    """MKT's `adjust_learning_rate` at fractional `epoch`: warm-up, then the half cosine; sets
    every group's lr (x its `lr_scale`) and returns the base lr."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (
            1.0
            + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs))
        )
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    return lr


def train_one_epoch(model, teacher, args: Args, optimizer, batches, label_emb, epoch: int):
    """`engine_nus.train` over one epoch's `batches` ((images [B, 3, H, W], labels [B, seen]
    in ±1 / 0) pairs): returns (the loss of each iteration, NaN where skipped; the base lrs)."""
    losses, lrs = [], []
    for i, (inputs, labels) in enumerate(batches):
        lrs.append(adjust_learning_rate(optimizer, i / len(batches) + epoch, args))
        optimizer.zero_grad()
        # remove images without a seen positive label (the official NUS_WIDE branch)
        seen_positives = torch.clamp(labels, 0, 1).sum(1)
        labels, inputs = labels[seen_positives > 0], inputs[seen_positives > 0]
        if inputs.shape[0] == 0:
            losses.append(math.nan)
            continue
        logits, _, dist_feat = model(inputs, label_emb[: args.num_seen])
        rank_loss = ranking_lossT(logits, labels.to(logits.dtype))
        with torch.no_grad():
            _, teacher_feat = teacher.encode_image(inputs)
        dist_loss = F.l1_loss(dist_feat, teacher_feat.to(dist_feat.dtype))
        loss = dist_loss + rank_loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, lrs


def frozen_copy(model):
    """The teacher: a copy of `model` as it is now, in eval mode, without gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def run(
    model,
    label_emb,
    epochs: Sequence[Sequence[tuple]],
    args: Args = Args(),
    teacher=None,
) -> TrainRun:
    """`train_nus.main`'s training on `epochs` (per epoch, its batches in order; evaluation,
    which changes nothing, left out) from `model`'s current weights (CLIP's, as loaded);
    `teacher`: the frozen CLIP model whose `encode_image` is distilled (default:
    `frozen_copy(model)`).

    Raises:
      ValueError: not one list of batches per epoch of `args.epochs`.
    """
    if len(epochs) != args.epochs:
        raise ValueError(f"{len(epochs)} epochs of batches given; args.epochs={args.epochs}")
    teacher = frozen_copy(model) if teacher is None else teacher
    optimizer = build_optimizer(args, model)
    losses, lrs = [], []
    for epoch in range(args.epochs):
        model.train()
        epoch_losses, epoch_lrs = train_one_epoch(
            model, teacher, args, optimizer, epochs[epoch], label_emb, epoch
        )
        losses += epoch_losses
        lrs += epoch_lrs
    return TrainRun(losses, lrs, numpy_state(model), optimizer_state(optimizer, model), None)

"""The classification losses of `mlgraph.losses` in plain torch, as the official codes train
with them: BCE (`BCEWithLogitsLoss`, mean) and ASL (`AsymmetricLossOptimized` with
`disable_torch_grad_focal_loss`: the focusing weight without gradient, the per-entry mean x
1000)."""

from __future__ import annotations

from mlgraph.torch_reference import require_torch

torch = require_torch()
F = torch.nn.functional


def _at_least_float32(x):
    # bfloat16 autocast logits are scored in float32; a float64 run (the parity tests' drift
    # measure) stays float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def asl(logits, targets, gamma_pos=0.0, gamma_neg=2.0, clip=0.0, eps=1e-5):
    """ASL of logits [B, C] against 0/1 targets (`mlgraph.losses.asl`'s equations)."""
    p = torch.sigmoid(_at_least_float32(logits))
    p_neg = 1 - p
    if clip > 0:
        p_neg = (p_neg + clip).clamp(max=1)
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    if gamma_pos > 0 or gamma_neg > 0:
        with torch.no_grad():
            w = torch.where(targets > 0, (1 - p) ** gamma_pos, (1 - p_neg) ** gamma_neg)
        loss = loss * w
    return -loss.sum() / logits.shape[0] / logits.shape[1] * 1000


def classification(logits, targets, loss_cfg):
    """`config.loss` ('bce' or 'asl' with its gammas, clip and eps) in torch.

    Raises:
      ValueError: another loss name.
    """
    if loss_cfg.name == "bce":
        return F.binary_cross_entropy_with_logits(_at_least_float32(logits), targets)
    if loss_cfg.name == "asl":
        return asl(
            logits,
            targets,
            gamma_pos=loss_cfg.gamma_pos,
            gamma_neg=loss_cfg.gamma_neg,
            clip=loss_cfg.clip,
            eps=loss_cfg.eps,
        )
    raise ValueError(f"config.loss.name={loss_cfg.name!r}: the torch references train bce or asl")

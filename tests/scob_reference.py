"""A Scob checkpoint file as the official `chinopie` framework saves it, for the converter's
tests; the torch Scob itself is `mlgraph.torch_reference.scob` (the official module names and
registration order)."""

from __future__ import annotations

import pytest
from torch_reference import randomize_batch_norms

torch = pytest.importorskip("torch")
from mlgraph.torch_reference.scob import TorchScob  # noqa: E402


def official_checkpoint(model: TorchScob, path, generator) -> None:
    """Write `model` as chinopie saves a Scob run (`checkpoint-<epoch>.pth`): the weights under
    'model' (drifted batch-norm statistics), the five-group Adam after a step, 'extra', and the
    StepLR state inside a 1-tuple (the official trailing comma)."""
    randomize_batch_norms(model, generator)
    groups = [
        [*model.fm1_14.linear_parts.parameters(), *model.fm1_28.linear_parts.parameters()],
        [
            *model.fm1_14.transformer_parts.parameters(),
            *model.fm1_28.transformer_parts.parameters(),
        ],
        list(model.projector.parameters()),
        list(model.fh.parameters()),
        list(model.g.parameters()),
    ]
    lrs = (1e-3, 4e-5, 1e-2, 1e-3, 1e-2)
    opt = torch.optim.Adam(
        [{"tag": "SELFNET", "params": p, "lr": lr} for p, lr in zip(groups, lrs, strict=True)]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=16, gamma=0.1)
    for group in groups:
        for p in group:
            p.grad = torch.randn(p.shape, generator=generator)
    opt.step()
    scheduler.step()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "extra": {"cur_epochi": 3, "best_score": 0.8712},
            "scheduler": (scheduler.state_dict(),),
        },
        path,
    )

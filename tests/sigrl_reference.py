"""A plain-torch SigRL with random weights for the tests: the model is
`mlgraph.torch_reference.sigrl.CLIPVIT` (written from docs/sigrl.md §2 with the official module
names), its parameters drawn by `test_backbones_transformers.randomize`."""

from __future__ import annotations

import pytest
from test_backbones_transformers import randomize

torch = pytest.importorskip("torch")

from mlgraph.torch_reference.sigrl import CLIPVIT  # noqa: E402


def random_clipvit(seed: int = 0, **sizes) -> CLIPVIT:
    """A `CLIPVIT` in eval mode with random weights (norm scales near 1; `randomize`)."""
    torch.manual_seed(seed)
    model = CLIPVIT(**sizes).eval()
    randomize(model, seed + 1)
    return model

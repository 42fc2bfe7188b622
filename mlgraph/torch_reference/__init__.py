"""Plain-PyTorch models with the official code's structure and attribute names, for the parity
tests and for `python -m mlgraph.bench train --against torch` (torch is optional: install it
with `pip install torch==2.13.0` or the `convert` extra).

`layers`: torchvision's v1.5 bottleneck and ResNet trunk, DETR's post-norm encoder layer and
sine table. `salgl`: SALGL (docs/salgl.md §1-§2) in training and evaluation, with the official
`[B, C, N, A]` attention and the co-occurrence update inside the training forward. `ssgrl`,
`mlgcn`, `q2l`, `sigrl`: those models with the official names; `scob`: the Scob network with
the official module names (docs/scob_spml.md §3.2, §4). `ssgrl_train`, `mlgcn_train`,
`q2l_train`, `salgl_train`, `sigrl_train`, `scob_train` and `spml_train`: the released training
loops of those methods and of the single-positive baselines (Cole et al.'s AN and ROLE, Zhou et
al.'s EM and EM+APL) transcribed in the official order of operations (`training`: the run
record, the epoch driver and the EMA the first five share).
"""

from __future__ import annotations

from mlgraph.errors import ConfigError


def require_torch():
    """The `torch` module.

    Raises:
      ConfigError: torch is not installed (with the command that installs the CPU build).
    """
    try:
        import torch
    except ImportError:
        raise ConfigError(
            "this needs PyTorch: pip install torch==2.13.0 (the CPU build), or "
            "pip install 'mlgraph[convert]'"
        ) from None
    return torch

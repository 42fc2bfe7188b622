"""ML-GCN in plain PyTorch with the official module layout (docs/ssgrl_mlgcn.md §3.1-§3.2, the
released `models.py`): `features` (a Sequential of conv1, bn1, ReLU, the 3x3/s2 max pool and
layer1..4 of a torchvision v1.5 ResNet), `pooling` (a max over the layer4 map), `gc1`/`gc2`
(bias-free `GraphConvolution`, weight stored (in, out)), `relu` (LeakyReLU 0.2) and the
Parameter `A` (gen_A's re-weighted correlation, never optimized), with `gen_adj` (D A^T D,
detached) in every forward and `get_config_optim`'s parameter groups. The word vectors are `inp`
(the official forward takes them as its second input), a buffer kept out of `state_dict()`, which
is an official checkpoint's."""

from __future__ import annotations

import math

import numpy as np

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.layers import TorchResNetTrunk, resnet_stages

torch = require_torch()
nn = torch.nn

# The released `nn.MaxPool2d(14, 14)`: a global max on a 448-px image's 14x14 layer4 map only.
OFFICIAL_WINDOW = 14


class TorchGraphConvolution(nn.Module):
    """The official bias-free `GraphConvolution`: adj @ (x @ weight), weight (in, out),
    initialised U(±1/sqrt(out))."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        stdv = 1.0 / math.sqrt(out)
        self.weight = nn.Parameter(torch.empty(inp, out).uniform_(-stdv, stdv))

    def forward(self, x, adj):
        return torch.matmul(adj, torch.matmul(x, self.weight))


def gen_adj(a):
    """The official `gen_adj`: D A^T D with D = diag(rowsum(A)^-1/2) (in A's dtype: the
    official `.float()` is a no-op on its float32 A, and a float64 run stays float64)."""
    d = torch.diag(torch.pow(a.sum(1), -0.5))
    return torch.matmul(torch.matmul(a, d).t(), d)


class TorchMLGCN(nn.Module):
    """The official `GCNResnet` over a torchvision ResNet of `layers` blocks and stem `width`;
    `a` [C, C] is gen_A's output, `words` [C, E] the word vectors; `pooling` a module over the
    layer4 map (default: a global max, what the released MaxPool2d(14, 14) is at 448 px)."""

    def __init__(
        self,
        layers,
        width: int,
        a: np.ndarray,
        words: np.ndarray,
        *,
        hidden: int = 1024,
        pooling: nn.Module | None = None,
    ):
        super().__init__()
        trunk = TorchResNetTrunk(layers, width)
        self.features = nn.Sequential(
            trunk.conv1,
            trunk.bn1,
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
            trunk.layer1,
            trunk.layer2,
            trunk.layer3,
            trunk.layer4,
        )
        self.pooling = nn.AdaptiveMaxPool2d(1) if pooling is None else pooling
        self.gc1 = TorchGraphConvolution(words.shape[1], hidden)
        self.gc2 = TorchGraphConvolution(hidden, trunk.num_features)
        self.relu = nn.LeakyReLU(0.2)
        self.A = nn.Parameter(torch.from_numpy(np.array(a, np.float32)))
        # A buffer outside the state dict: it follows .to() and .double(), and the checkpoint
        # stays the official one.
        self.register_buffer("inp", torch.from_numpy(np.array(words, np.float32)), persistent=False)

    def forward(self, images):
        feature = self.pooling(self.features(images)).flatten(1)
        adj = gen_adj(self.A).detach()
        x = self.gc2(self.relu(self.gc1(self.inp, adj)), adj)
        return torch.matmul(feature, x.transpose(0, 1))

    def get_config_optim(self, lr: float, lrp: float) -> list[dict]:
        """The official parameter groups: the backbone at lr x lrp, the graph convolutions at
        lr (`A` is in none: never optimized)."""
        return [
            {"params": self.features.parameters(), "lr": lr * lrp},
            {"params": self.gc1.parameters(), "lr": lr},
            {"params": self.gc2.parameters(), "lr": lr},
        ]


def from_config(model_cfg, a: np.ndarray, words: np.ndarray) -> TorchMLGCN:
    """The torch ML-GCN that `config.model` (an mlgraph `mlgcn` config) describes with gen_A's
    `a` [C, C] and word vectors `words` [C, E], randomly initialised as torch does; pool
    'global' is a true global max, 'official' the released MaxPool2d(14, 14).

    Raises:
      ValueError: a non-ResNet backbone.
    """
    pooling = None if model_cfg.pool == "global" else nn.MaxPool2d(OFFICIAL_WINDOW, OFFICIAL_WINDOW)
    return TorchMLGCN(
        *resnet_stages(model_cfg, "ML-GCN"), a, words, hidden=model_cfg.hidden_dim, pooling=pooling
    )

"""SSGRL in plain PyTorch with the official module layout (docs/ssgrl_mlgcn.md §1-§2): the ResNet
trunk with the extra `avgpool1` (2x2/s2), semantic decoupling (`word_semantic`), the gated
graph network over the fixed graph M (`graph_net`, the official reset gate that reuses U_z
unless `paper=True`), `fc_output` and the per-class classifiers. The word vectors and M are
buffers kept out of `state_dict()` (plain attributes in the official code), which is an
official checkpoint's."""

from __future__ import annotations

import numpy as np

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.layers import TorchElementWise, TorchResNetTrunk, resnet_stages

torch = require_torch()
nn = torch.nn


class TorchResNet(TorchResNetTrunk):
    """The official backbone: conv1..layer4, then `avgpool1` (2x2/s2) when `extra_pool`."""

    def __init__(self, layers, width: int, extra_pool: bool = True):
        super().__init__(layers, width)
        self.avgpool1 = nn.AvgPool2d(2, 2) if extra_pool else nn.Identity()

    def forward(self, x):
        return self.avgpool1(self.layer4_map(x))


class TorchSemantic(nn.Module):
    """docs/ssgrl_mlgcn.md §1.2: tanh(U f ⊙ V x) -> fc_3 -> fc_a -> softmax over locations ->
    weighted sum of f."""

    def __init__(self, d: int, e: int, a: int):
        super().__init__()
        self.fc_1 = nn.Linear(d, a, bias=False)
        self.fc_2 = nn.Linear(e, a, bias=False)
        self.fc_3 = nn.Linear(a, a)
        self.fc_a = nn.Linear(a, 1)

    def forward(self, fmap, words):
        b, d, h, w = fmap.shape
        f = fmap.permute(0, 2, 3, 1).reshape(b, h * w, d)  # [B, N, D]
        g = torch.tanh(self.fc_1(f)[:, :, None] * self.fc_2(words)[None, None])  # [B, N, C, A]
        logits = self.fc_a(self.fc_3(g)).squeeze(-1)  # [B, N, C]
        att = logits.softmax(dim=1)
        return torch.einsum("bnc,bnk->bck", att, f)


class TorchGGNN(nn.Module):
    """docs/ssgrl_mlgcn.md §1.5 with the official reset gate (U_z) unless `paper=True`."""

    def __init__(self, d: int, steps: int, paper: bool):
        super().__init__()
        for eq in (3, 4, 5):
            setattr(self, f"fc_eq{eq}_w", nn.Linear(2 * d, d))
            setattr(self, f"fc_eq{eq}_u", nn.Linear(d, d))
        self.steps, self.paper = steps, paper

    def forward(self, h, in_matrix, out_matrix):
        for _ in range(self.steps):
            a = torch.cat(
                [
                    torch.einsum("cd,bdk->bck", in_matrix, h),
                    torch.einsum("cd,bdk->bck", out_matrix, h),
                ],
                -1,
            )
            z = torch.sigmoid(self.fc_eq3_w(a) + self.fc_eq3_u(h))
            u_r = self.fc_eq4_u if self.paper else self.fc_eq3_u
            r = torch.sigmoid(self.fc_eq4_w(a) + u_r(h))
            cand = torch.tanh(self.fc_eq5_w(a) + self.fc_eq5_u(r * h))
            h = (1 - z) * h + z * cand
        return h


class TorchSSGRL(nn.Module):
    """The official `SSGRL` module; `words` [C, E] and the graph M [C, C] are attributes."""

    def __init__(
        self,
        trunk: TorchResNet,
        words: np.ndarray,
        graph: np.ndarray,
        *,
        att_dim: int = 1024,
        steps: int = 3,
        paper: bool = False,
    ):
        super().__init__()
        self.resnet_101 = trunk
        d = trunk.num_features
        self.word_semantic = TorchSemantic(d, words.shape[1], att_dim)
        self.graph_net = TorchGGNN(d, steps, paper)
        self.fc_output = nn.Linear(2 * d, d)
        self.classifiers = TorchElementWise(words.shape[0], d)
        # Buffers outside the state dict (plain attributes in the official code): they follow
        # .to() and .double(), and the checkpoint stays the official one.
        constants = {"word_features": words, "in_matrix": graph, "out_matrix": graph.T}
        for name, value in constants.items():
            self.register_buffer(
                name, torch.from_numpy(np.array(value, np.float32)), persistent=False
            )

    def forward(self, images):
        h0 = self.word_semantic(self.resnet_101(images), self.word_features)
        ht = self.graph_net(h0, self.in_matrix, self.out_matrix)
        return self.classifiers(torch.tanh(self.fc_output(torch.cat([ht, h0], -1))))

    def train(self, mode: bool = True):
        """The official mode switch for `bn_train='layer4'`: the backbone's batch norms in eval
        mode except layer4's."""
        super().train(mode)
        if mode:
            self.resnet_101.eval()
            self.resnet_101.layer4.train()
        return self


def from_config(model_cfg, num_classes: int, words: np.ndarray, graph: np.ndarray) -> TorchSSGRL:
    """The torch SSGRL that `config.model` (an mlgraph `ssgrl` config) describes with word
    vectors `words` [C, E] and graph `graph` [C, C], randomly initialised as torch does.

    Raises:
      ValueError: a non-ResNet backbone, or `bn_train` other than 'layer4' (the official).
    """
    if model_cfg.bn_train != "layer4":
        raise ValueError(
            f"config.model.bn_train={model_cfg.bn_train!r}: the torch SSGRL trains as the "
            "official code, 'layer4'"
        )
    if words.shape[0] != num_classes or graph.shape != (num_classes, num_classes):
        raise ValueError(
            f"words {words.shape} and graph {graph.shape}: expected [{num_classes}, E] and "
            f"[{num_classes}, {num_classes}]"
        )
    trunk = TorchResNet(*resnet_stages(model_cfg, "SSGRL"), extra_pool=model_cfg.extra_pool)
    return TorchSSGRL(
        trunk,
        words,
        graph,
        att_dim=model_cfg.att_dim,
        steps=model_cfg.num_steps,
        paper=not model_cfg.reset_uses_update_u,
    )

"""SALGL in plain PyTorch with the official structure and attribute names (docs/salgl.md §1-§2):
the backbone's layer4 tokens, one post-norm encoder layer (`tb`), the scene classifier, the
co-occurrence counts updated inside the training forward (hard or soft scenes), the low-rank
bilinear attention with its full `[B, C, N, A]` hidden tensor, the gated GNN, `fc` and the
per-class classifier; ASL plus the two scene-entropy terms as the loss. Its `state_dict()` is
an official checkpoint's (without the `module.` prefix), so `mlgraph.convert.salgl` maps it.
"""

from __future__ import annotations

from mlgraph.torch_reference import losses, require_torch
from mlgraph.torch_reference.layers import (
    TorchElementWise,
    TorchEncoderLayer,
    TorchResNetTrunk,
    resnet_stages,
    torch_sine_table,
)

torch = require_torch()
nn = torch.nn
F = torch.nn.functional


class TorchResNet(TorchResNetTrunk):
    """The trunk, returning layer4 as tokens [B, H*W, C] (row-major)."""

    def forward(self, x):
        return self.layer4_map(x).flatten(2).transpose(1, 2)


class TorchEncoder(nn.Module):
    """`tb`: a list holding the one encoder layer, no final norm."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, x, pos=None):
        for layer in self.layers:
            x = layer(x, pos)
        return x


class TorchPositionEmbedding(nn.Module):
    """Holds the sine table as the persistent buffer `pe` [1, D, H, W]."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.register_buffer("pe", torch_sine_table(d, grid))


class TorchGGNN(nn.Module):
    """Gated GNN (docs/salgl.md §1.10), weights shared across steps."""

    def __init__(self, d: int, steps: int, outmess: bool):
        super().__init__()
        din = 2 * d if outmess else d
        for i in (1, 2, 3):
            setattr(self, f"fc{i}_w", nn.Linear(din, d))
            setattr(self, f"fc{i}_u", nn.Linear(d, d))
        self.steps, self.outmess = steps, outmess

    def forward(self, h, a):
        for _ in range(self.steps):
            m = torch.bmm(a, h)
            if self.outmess:
                m = torch.cat([m, torch.bmm(a.transpose(1, 2), h)], -1)
            z = torch.sigmoid(self.fc1_w(m) + self.fc1_u(h))
            r = torch.sigmoid(self.fc2_w(m) + self.fc2_u(h))
            cand = torch.tanh(self.fc3_w(m) + self.fc3_u(r * h))
            h = (1 - z) * h + z * cand
        return h


class TorchAttention(nn.Module):
    """Low-rank bilinear attention, unfolded: the full [B, C, N, A] hidden projection."""

    def __init__(self, d: int, e: int, a: int):
        super().__init__()
        self.linear1 = nn.Linear(d, a, bias=False)
        self.linear2 = nn.Linear(e, a, bias=False)
        self.hidden_linear = nn.Linear(a, a)
        self.target_linear = nn.Linear(a, 1)

    def forward(self, x, labels):
        z = torch.tanh(self.linear1(x)[:, None] * self.linear2(labels)[:, :, None])
        alpha = self.target_linear(self.hidden_linear(z)).squeeze(-1).softmax(-1)
        return torch.bmm(alpha, x), alpha


def _entropy(x):
    return -(x * torch.log(x + 1e-7)).sum(-1).mean()


class TorchSALGL(nn.Module):
    """SALGL (docs/salgl.md §1) with the official attribute names; `forward(images, targets)` in
    training mode also adds the batch's scene-assigned label co-occurrences to `comatrix`."""

    def __init__(
        self,
        backbone,
        *,
        num_classes: int,
        num_scenes: int,
        embed_dim: int,
        steps: int,
        outmess: bool,
        pos_grid: int | None,
        normalize: bool,
        ignore_self: bool,
        soft: bool,
        random: bool,
        heads: int = 8,
        ffn_dim: int = 2048,
        att_dim: int = 1024,
        dropout: float = 0.1,
    ):
        super().__init__()
        d = backbone.num_features
        c, k = num_classes, num_scenes
        self.backbone = backbone
        self.tb = TorchEncoder(TorchEncoderLayer(d, heads, ffn_dim, dropout))
        if pos_grid:
            self.position_embedding = TorchPositionEmbedding(d, pos_grid)
        if random:
            self.embeddings = nn.Parameter(torch.randn(c, d))
        else:
            self.register_buffer("embeddings", torch.randn(c, embed_dim))
        self.scene_linear = nn.Linear(d, k, bias=False)
        self.ggnn = TorchGGNN(d, steps, outmess)
        self.register_buffer("comatrix", torch.zeros(k, c, c))
        self.attention = TorchAttention(d, self.embeddings.shape[1], att_dim)
        self.fc = nn.Sequential(nn.Linear(2 * d if steps > 0 else d, d), nn.Tanh())
        self.classifier = TorchElementWise(c, d)
        self.num_classes, self.num_scenes = c, k
        self.steps, self.pos = steps, bool(pos_grid)
        self.normalize, self.ignore_self, self.soft = normalize, ignore_self, soft

    def transition(self, comatrix):
        """comatrix2prob (docs/salgl.md §1.8): P_k[i, j] = C_k[j, i] / (C_k[i, i] + 1e-8), then
        the options."""
        t = comatrix.transpose(1, 2)
        p = t / (torch.diagonal(t, dim1=1, dim2=2)[..., None] + 1e-8)
        if self.ignore_self:
            p = p * (1 - torch.eye(self.num_classes))[None]
        if self.normalize:
            p = p / (p.sum(-1, keepdim=True) + 1e-8)
        return p

    def forward(self, images, targets=None):
        x = self.backbone(images)
        pos = self.position_embedding.pe.flatten(2).transpose(1, 2) if self.pos else None
        x = self.tb(x, pos)
        probs = self.scene_linear(x.mean(1)).softmax(-1)
        comatrix = self.comatrix
        if self.training and targets is not None:
            # docs/salgl.md §1.7: the current batch is counted before its graph is built.
            pairs = targets[:, :, None] * targets[:, None, :]
            if self.soft:
                comatrix = self.comatrix.detach() + torch.einsum("bk,bij->kij", probs, pairs)
            else:
                onehot = F.one_hot(probs.argmax(-1), self.num_scenes).to(pairs.dtype)
                comatrix = self.comatrix + torch.einsum("bk,bij->kij", onehot, pairs)
            self.comatrix.copy_(comatrix.detach())
        p = self.transition(comatrix)
        if self.soft:
            adjacency = (probs[:, :, None, None] * p[None]).sum(1)
        else:
            adjacency = p[probs.argmax(-1)]
        labels = self.embeddings[None].repeat(x.shape[0], 1, 1)
        feats, alphas = self.attention(x, labels)
        if self.steps > 0:
            feats = torch.cat([feats, self.ggnn(feats, adjacency)], -1)
        logits = self.classifier(self.fc(feats))
        # The official `max_en`: the entropy of the uniform scene distribution with the
        # entropy's own 1e-7 offset (log K up to ~1e-7 K).
        h_max = _entropy(probs.new_full((self.num_scenes,), 1.0 / self.num_scenes))
        return {
            "logits": logits,
            "scene_probs": probs,
            "att_weights": alphas,
            "adjacency": adjacency,
            "sample_en": _entropy(probs),
            "batch_en": (h_max - _entropy(probs.mean(0))) * 100,
        }


def salgl_loss(out, targets, loss_cfg):
    """L = cls + lamda (sample_en + batch_en) (docs/salgl.md §2), cls `config.loss` (ASL in the
    recipes)."""
    cls = losses.classification(out["logits"], targets, loss_cfg)
    return cls + loss_cfg.lamda * (out["sample_en"] + out["batch_en"])


def from_config(model_cfg, num_classes: int, image_size: int) -> TorchSALGL:
    """The torch SALGL that `config.model` (an mlgraph `salgl` config) describes, randomly
    initialised as torch does (ResNet backbones only, `backbone_kwargs` layers and width
    honoured; `embed_type` 'file' or 'checkpoint' gives a random fixed embedding table of
    width `embed_dim`, 768 when 0; the encoder's dropout `dropout`)."""
    trunk = TorchResNet(*resnet_stages(model_cfg, "SALGL"))
    return TorchSALGL(
        trunk,
        num_classes=num_classes,
        num_scenes=model_cfg.num_scenes,
        embed_dim=model_cfg.embed_dim or 768,
        steps=model_cfg.num_steps,
        outmess=model_cfg.outmess,
        pos_grid=image_size // 32 if model_cfg.pos else None,
        normalize=model_cfg.normalize,
        ignore_self=model_cfg.ignore_self,
        soft=model_cfg.soft,
        random=model_cfg.embed_type == "random",
        heads=model_cfg.heads,
        ffn_dim=model_cfg.ffn_dim,
        att_dim=model_cfg.att_dim,
        dropout=model_cfg.dropout,
    )

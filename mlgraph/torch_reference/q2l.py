"""Query2Label in plain PyTorch with the official names (docs/ssgrl_mlgcn.md §4.1-§4.2): `backbone`
a Sequential of the ResNet wrapper (`.body`, FrozenBatchNorm2d) and the position module (buffer
`pe`, DETR's normalised sine table), `input_proj` (Identity or a 1x1 conv),
`transformer.encoder.layers` / `transformer.decoder.layers` (DETR post-norm layers on
`nn.MultiheadAttention`, decoder self-attention removable per layer), `transformer.decoder.norm`,
`query_embed` (nn.Embedding) and `fc` (GroupWiseLinear `W`, `b`). Batch-first where the
official code is sequence-first (the same computation). `state_dict()` is the released
checkpoint's without its `module.` prefix."""

from __future__ import annotations

import math

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.layers import (
    TorchEncoderLayer,
    TorchResNetTrunk,
    resnet_stages,
    torch_sine_table,
)

torch = require_torch()
nn = torch.nn
F = torch.nn.functional


class FrozenBatchNorm2d(nn.Module):
    """DETR's FrozenBatchNorm2d: affine and statistics are buffers, eps 1e-5."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def freeze_batch_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d under `module` by a FrozenBatchNorm2d with its values."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child))
        else:
            freeze_batch_norms(child)


class BackboneBase(nn.Module):
    """The IntermediateLayerGetter wrapper: `body` = torchvision conv1..layer4."""

    def __init__(self, layers, width: int):
        super().__init__()
        self.body = TorchResNetTrunk(layers, width)
        self.num_channels = self.body.num_features


class PositionEmbeddingSine(nn.Module):
    """The sine table for a grid x grid map, stored as buffer `pe` (1, D, grid, grid)."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.register_buffer("pe", torch_sine_table(d, grid))


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer; `self_attn=False` is Q2L's removed self-attention."""

    def __init__(self, d: int, heads: int, ffn: int, self_attn: bool, dropout: float = 0.1):
        super().__init__()
        if self_attn:
            self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
            self.norm1 = nn.LayerNorm(d)
        self.omit_selfattn = not self_attn
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos):
        if not self.omit_selfattn:
            q = k = tgt + query_pos
            tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        t2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory)[0]
        tgt = self.norm2(tgt + self.dropout2(t2))
        t2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(t2))


class Stack(nn.Module):
    """`layers` (a ModuleList) and an optional final `norm`."""

    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class Transformer(nn.Module):
    """The encoder over the layer4 tokens and the query decoder with its final norm."""

    def __init__(self, d, heads, ffn, enc, dec, keep_first, keep_other, dropout=0.1):
        super().__init__()
        self.encoder = Stack([TorchEncoderLayer(d, heads, ffn, dropout) for _ in range(enc)])
        self.decoder = Stack(
            [
                DecoderLayer(d, heads, ffn, keep_first if i == 0 else keep_other, dropout)
                for i in range(dec)
            ],
            nn.LayerNorm(d),
        )

    def forward(self, src, query_embed, pos):
        b = src.shape[0]
        memory = src.flatten(2).transpose(1, 2)  # B, HW, D
        pos = pos.flatten(2).transpose(1, 2)  # 1, HW, D
        query = query_embed.unsqueeze(0).repeat(b, 1, 1)  # B, K, D
        for layer in self.encoder.layers:
            memory = layer(memory, pos)
        tgt = torch.zeros_like(query)
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, pos, query)
        return self.decoder.norm(tgt)  # B, K, D


class GroupWiseLinear(nn.Module):
    """Per-label linear classifiers: `W` [1, K, D], `b` [1, K]."""

    def __init__(self, k: int, d: int):
        super().__init__()
        stdv = 1.0 / math.sqrt(d)
        self.W = nn.Parameter(torch.empty(1, k, d).uniform_(-stdv, stdv))
        self.b = nn.Parameter(torch.empty(1, k).uniform_(-stdv, stdv))

    def forward(self, x):
        return (self.W * x).sum(-1) + self.b


class TorchQ2L(nn.Module):
    """The official `Qeruy2Label` module (sic) for `num_classes` labels at `image_size` px."""

    def __init__(
        self,
        layers,
        width: int,
        *,
        num_classes: int,
        image_size: int,
        d: int,
        heads: int,
        ffn: int,
        enc: int,
        dec: int,
        keep_input_proj: bool,
        keep_first: bool,
        keep_other: bool,
        dropout: float = 0.1,
    ):
        super().__init__()
        base = BackboneBase(layers, width)
        self.backbone = nn.Sequential(base, PositionEmbeddingSine(d, image_size // 32))
        self.input_proj = (
            nn.Conv2d(base.num_channels, d, kernel_size=1) if keep_input_proj else nn.Identity()
        )
        self.transformer = Transformer(d, heads, ffn, enc, dec, keep_first, keep_other, dropout)
        self.query_embed = nn.Embedding(num_classes, d)
        self.fc = GroupWiseLinear(num_classes, d)

    def forward(self, images):
        src = self.backbone[0].body(images)
        hs = self.transformer(self.input_proj(src), self.query_embed.weight, self.backbone[1].pe)
        return self.fc(hs)


def from_config(model_cfg, num_classes: int, image_size: int) -> TorchQ2L:
    """The torch Query2Label that `config.model` (an mlgraph `q2l` config) describes, randomly
    initialised as torch does, its batch norms frozen when `frozen_bn` (the official).

    Raises:
      ValueError: a non-ResNet backbone.
    """
    model = TorchQ2L(
        *resnet_stages(model_cfg, "Query2Label"),
        num_classes=num_classes,
        image_size=image_size,
        d=model_cfg.hidden_dim,
        heads=model_cfg.num_heads,
        ffn=model_cfg.ffn_dim,
        enc=model_cfg.enc_layers,
        dec=model_cfg.dec_layers,
        keep_input_proj=model_cfg.keep_input_proj,
        keep_first=model_cfg.keep_first_self_attn_dec,
        keep_other=model_cfg.keep_other_self_attn_dec,
        dropout=model_cfg.dropout,
    )
    if model_cfg.frozen_bn:
        freeze_batch_norms(model.backbone)
    return model

"""OpenAI CLIP's image tower in plain torch with OpenAI's module names (`clip/model.py`:
`QuickGELU`, `ResidualAttentionBlock`, `Transformer`, `VisionTransformer`), so that its
`state_dict()` has the `visual.*` layout of a CLIP archive and SigRL's student re-wires its
parts as the official `CLIPVIT` does (docs/sigrl.md §2.1, §6.2)."""

from __future__ import annotations

import collections

from mlgraph.torch_reference import require_torch

torch = require_torch()
nn = torch.nn


class QuickGELU(nn.Module):
    """z·σ(1.702 z)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + MHA(ln_1(x)), then x + MLP(ln_2(x)) (c_fc, QuickGELU, c_proj)."""

    def __init__(self, d: int, heads: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            collections.OrderedDict(
                [
                    ("c_fc", nn.Linear(d, 4 * d)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(4 * d, d)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(d)
        self.attn_mask = attn_mask

    def forward(self, x):  # x: [L, N, D], as in OpenAI's code
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`resblocks`, and OpenAI's `layers` count (MKT's layer-wise decay reads it)."""

    def __init__(self, d: int, layers: int, heads: int, attn_mask=None):
        super().__init__()
        self.width, self.layers = d, layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(d, heads, attn_mask) for _ in range(layers)]
        )

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """The image tower: conv1 (no bias), class and positional embeddings, ln_pre, the blocks,
    ln_post, proj [width, out]."""

    def __init__(self, image: int, patch: int, d: int, layers: int, heads: int, out: int):
        super().__init__()
        scale = d**-0.5  # OpenAI's initialisation of the three free tensors
        self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image // patch) ** 2 + 1, d))
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, layers, heads)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Parameter(scale * torch.randn(d, out))

    def forward(self, x):
        """-> (all tokens after ln_post, OpenAI's image features ln_post(CLS) @ proj)."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + x.new_zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x), self.ln_post(x[:, 0, :]) @ self.proj

"""Shared plain-torch parts of the reference models: torchvision's v1.5 bottleneck and ResNet
trunk, DETR's post-norm encoder layer and normalised sine table (written from the method notes
in docs/, with the official attribute names)."""

from __future__ import annotations

import math

from mlgraph.torch_reference import require_torch

torch = require_torch()
nn = torch.nn
F = torch.nn.functional

# torchvision's block counts per stage.
RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


class TorchBottleneck(nn.Module):
    """torchvision's v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, inp: int, width: int, stride: int):
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(inp, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNetTrunk(nn.Module):
    """torchvision's conv1, bn1, layer1..4 (no fc); `layer4_map` gives the [B, C, h, w] map."""

    def __init__(self, layers, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inp = width
        for i, blocks in enumerate(layers):
            w = width * 2**i
            stage = []
            for b in range(blocks):
                stage.append(TorchBottleneck(inp, w, (1 if i == 0 else 2) if b == 0 else 1))
                inp = 4 * w
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = inp

    def layer4_map(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x):
        return self.layer4_map(x)


class TorchEncoderLayer(nn.Module):
    """DETR's post-norm encoder layer on batch-first tokens (docs/salgl.md §1.3, Q2L's encoder);
    with `activation` F.leaky_relu and a `key_padding_mask` (True = ignored), Scob's layer."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float = 0.1, activation=F.relu):
        super().__init__()
        self.activation = activation
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, ffn)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x, pos=None, key_padding_mask=None):
        qk = x if pos is None else x + pos
        attn = self.self_attn(qk, qk, x, key_padding_mask=key_padding_mask)[0]
        x = self.norm1(x + self.dropout1(attn))
        y = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(y))


class TorchElementWise(nn.Module):
    """Per-class linear classifier: weight [C, D], bias [C]."""

    def __init__(self, c: int, d: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d)
        self.weight = nn.Parameter(torch.empty(c, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(c).uniform_(-bound, bound))

    def forward(self, x):
        return (x * self.weight).sum(2) + self.bias


def torch_sine_table(d: int, grid: int):
    """DETR's normalised sine table (docs/salgl.md §1.2, docs/ssgrl_mlgcn.md §4.1) in float32:
    [1, D, grid, grid], the y-features first."""
    f = d // 2
    ones = torch.ones(1, grid, grid)
    y = ones.cumsum(1) / (grid + 1e-6) * 2 * math.pi
    x = ones.cumsum(2) / (grid + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(f, dtype=torch.float32) // 2) / f)

    def feats(coord):
        arg = coord[..., None] / dim_t
        return torch.stack((arg[..., 0::2].sin(), arg[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((feats(y), feats(x)), dim=3).permute(0, 3, 1, 2)


def resnet_stages(model_cfg, method: str) -> tuple[tuple[int, ...], int]:
    """(blocks per stage, stem width) of the torchvision ResNet `model_cfg.backbone` names,
    with `backbone_kwargs` layers and width honoured.

    Raises:
      ValueError: a backbone the torch references do not build.
    """
    backbone = model_cfg.backbone
    if backbone not in RESNET_LAYERS:
        raise ValueError(
            f"config.model.backbone={backbone!r}: the torch {method} is built for "
            f"{', '.join(RESNET_LAYERS)}"
        )
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    return tuple(kwargs.get("layers", RESNET_LAYERS[backbone])), kwargs.get("width", 64)

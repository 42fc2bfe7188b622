"""A plain-torch Scob written from docs/scob_spml.md §3.2 and §4 with the official module names and
registration order, so that its `state_dict()` has the official key layout, the duplicate
`linear_parts` / `transformer_parts` registrations included; and a checkpoint file as the
official `chinopie` framework saves it."""

from __future__ import annotations

import copy

import pytest
from torch_reference import TorchEncoderLayer, TorchResNetTrunk, randomize_batch_norms

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class TorchLearnedPositions(nn.Module):
    """DETR's `PositionEmbeddingLearned`: pos[:, y, x] = [col_embed[x] ; row_embed[y]]."""

    def __init__(self, features: int, table: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(table, features)
        self.col_embed = nn.Embedding(table, features)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x):
        h, w = x.shape[-2:]
        col = self.col_embed(torch.arange(w)).unsqueeze(0).repeat(h, 1, 1)
        row = self.row_embed(torch.arange(h)).unsqueeze(1).repeat(1, w, 1)
        return torch.cat([col, row], dim=-1).permute(2, 0, 1).unsqueeze(0).repeat(len(x), 1, 1, 1)


class TorchEncoder(nn.Module):
    """Scob's `TransformerEncoder`: deep copies of one layer, then a final norm."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = norm

    def forward(self, x, key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, key_padding_mask=key_padding_mask)
        return self.norm(x)


class TorchImageMid(nn.Module):
    """Scob's `ImageMid` (models/__init__.py), modules registered as the official code does."""

    def __init__(self, in_features: int, dim: int, heads: int, ffn: int, num_layers: int = 2):
        super().__init__()
        self.dim = dim
        layer = TorchEncoderLayer(dim, heads, ffn, 0.1, activation=F.leaky_relu)
        self.encoder = TorchEncoder(layer, num_layers, nn.LayerNorm(dim))
        self.feat_conv = nn.Conv2d(in_features, dim, 1)
        self.pos_encoder = TorchLearnedPositions(dim // 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear_parts = nn.ModuleList([self.feat_conv, self.pos_encoder, self.avgpool])
        self.transformer_parts = self.encoder

    def forward(self, x, ignored=None):
        """A map [B, in, h, w] (and key padding mask [B, h, w], True = ignored) -> [B, D]."""
        b, _, h, w = x.shape
        x = self.feat_conv(x)
        x = x + self.pos_encoder(x)
        tokens = x.permute(0, 2, 3, 1).flatten(1, 2)
        mask = None if ignored is None else ignored.flatten(1, 2)
        out = self.encoder(tokens, key_padding_mask=mask)
        return self.avgpool(out.permute(0, 2, 1).reshape(b, self.dim, h, w)).flatten(1)


class TorchProjector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.projector1 = nn.Linear(dim, dim)
        self.relu = nn.LeakyReLU()
        self.projector2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.projector2(self.relu(self.projector1(x)))


class TorchClassifier(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.classifier(x)  # the official module applies a sigmoid after this


class TorchBackbone(nn.Module):
    """`fb`: a torchvision ResNet under `backbone` (with its unused `fc`), giving layer3 and
    layer4."""

    def __init__(self, layers, width: int):
        super().__init__()
        self.backbone = TorchResNetTrunk(layers, width)
        self.backbone.fc = nn.Linear(self.backbone.num_features, 1000)

    def forward(self, x):
        t = self.backbone
        x = F.max_pool2d(F.relu(t.bn1(t.conv1(x))), 3, 2, 1)
        x28 = t.layer3(t.layer2(t.layer1(x)))
        return t.layer4(x28), x28


class TorchLabelEstimator(nn.Module):
    def __init__(self, num_train: int, num_classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num_train, num_classes))


class TorchScob(nn.Module):
    """The official `Scob` module tree: fb, fm1_14, fm1_28, fm2_14, fm2_28, projector, fh, g."""

    def __init__(self, *, layers, width, dim, heads, ffn, num_classes, num_train, num_layers=2):
        super().__init__()
        self.fb = TorchBackbone(layers, width)
        c32 = self.fb.backbone.num_features
        mid = dict(dim=dim, heads=heads, ffn=ffn, num_layers=num_layers)
        self.fm1_14 = TorchImageMid(c32, **mid)
        self.fm1_28 = TorchImageMid(c32 // 2, **mid)
        self.fm2_14 = TorchImageMid(c32, **mid)
        self.fm2_28 = TorchImageMid(c32 // 2, **mid)
        self.projector = TorchProjector(2 * dim)
        self.fh = TorchClassifier(num_classes, 2 * dim)
        self.g = TorchLabelEstimator(num_train, num_classes)

    def forward(self, images):
        """Images [B, 3, S, S] -> pre-sigmoid logits [B, C] (eval: no masks)."""
        x14, x28 = self.fb(images)
        return self.fh(torch.cat([self.fm1_14(x14), self.fm1_28(x28)], dim=1))


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

"""Scob in plain PyTorch with the official module names and registration order
(docs/scob_spml.md §3.2, §4), so that its `state_dict()` has the official key layout, the
duplicate `linear_parts` / `transformer_parts` registrations included: the frozen ResNet `fb`
(layer4 and layer3 maps, its unused `fc` kept), the masked transformers `fm1_*` (online) and
`fm2_*` ("momentum"), the projector, the classifier `fh` and the label estimator `g`.

`TorchScob.forward(images)` gives the pre-sigmoid logits (evaluation, no masks); `heads` is the
official `Scob.forward` (probabilities, projected features, estimated labels) and `keys` the
official `forward_k`.
"""

from __future__ import annotations

import copy

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.layers import TorchEncoderLayer, TorchResNetTrunk, resnet_stages

torch = require_torch()
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
        col = self.col_embed(torch.arange(w, device=x.device)).unsqueeze(0).repeat(h, 1, 1)
        row = self.row_embed(torch.arange(h, device=x.device)).unsqueeze(1).repeat(1, w, 1)
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

    def __init__(
        self,
        in_features: int,
        dim: int,
        heads: int,
        ffn: int,
        num_layers: int = 2,
        dropout: float = 0.1,
        pos_table: int = 50,
    ):
        super().__init__()
        self.dim = dim
        layer = TorchEncoderLayer(dim, heads, ffn, dropout, activation=F.leaky_relu)
        self.encoder = TorchEncoder(layer, num_layers, nn.LayerNorm(dim))
        self.feat_conv = nn.Conv2d(in_features, dim, 1)
        self.pos_encoder = TorchLearnedPositions(dim // 2, pos_table)
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
    """`FeatProjector`: Linear -> LeakyReLU -> Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.projector1 = nn.Linear(dim, dim)
        self.relu = nn.LeakyReLU()
        self.projector2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.projector2(self.relu(self.projector1(x)))


class TorchClassifier(nn.Module):
    """`ImageClassifier` (fh) without its sigmoid: the pre-sigmoid scores."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.classifier(x)  # the official module applies a sigmoid after this


class TorchBackbone(nn.Module):
    """`fb`: a torchvision ResNet under `backbone` (with its unused `fc`), giving layer4 and
    layer3."""

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
    """`g`: the logits Phi [N_train, C]; `forward(idx)` = sigmoid(Phi[idx])."""

    def __init__(self, num_train: int, num_classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num_train, num_classes))

    def forward(self, indices):
        return torch.sigmoid(self.logits[indices, :])


class TorchScob(nn.Module):
    """The official `Scob` module tree: fb, fm1_14, fm1_28, fm2_14, fm2_28, projector, fh, g."""

    def __init__(
        self,
        *,
        layers,
        width,
        dim,
        heads,
        ffn,
        num_classes,
        num_train,
        num_layers=2,
        dropout=0.1,
        pos_table=50,
    ):
        super().__init__()
        self.fb = TorchBackbone(layers, width)
        c32 = self.fb.backbone.num_features
        mid = dict(
            dim=dim,
            heads=heads,
            ffn=ffn,
            num_layers=num_layers,
            dropout=dropout,
            pos_table=pos_table,
        )
        self.fm1_14 = TorchImageMid(c32, **mid)
        self.fm1_28 = TorchImageMid(c32 // 2, **mid)
        self.fm2_14 = TorchImageMid(c32, **mid)
        self.fm2_28 = TorchImageMid(c32 // 2, **mid)
        self.projector = TorchProjector(2 * dim)
        self.fh = TorchClassifier(num_classes, 2 * dim)
        self.g = TorchLabelEstimator(num_train, num_classes)

    def online(self, x14, x28, ignored14=None, ignored28=None):
        """[fm1_14(x14) ; fm1_28(x28)] with key padding masks (True = ignored)."""
        return torch.cat([self.fm1_14(x14, ignored14), self.fm1_28(x28, ignored28)], dim=1)

    def heads(self, images, idx, ignored14=None, ignored28=None):
        """The official `Scob.forward`: (probabilities [B, C], projected features [B, 2D],
        estimated labels sigmoid(Phi[idx]) [B, C])."""
        x14, x28 = self.fb(images)
        h = self.online(x14, x28, ignored14, ignored28)
        return torch.sigmoid(self.fh(h)), self.projector(h), self.g(idx)

    def keys(self, images, ignored14=None, ignored28=None):
        """The official `forward_k` (no gradient): [fm2_14 ; fm2_28] of the masked maps."""
        with torch.no_grad():
            x14, x28 = self.fb(images)
            return torch.cat([self.fm2_14(x14, ignored14), self.fm2_28(x28, ignored28)], dim=1)

    def forward(self, images):
        """Images [B, 3, S, S] -> pre-sigmoid logits [B, C] (eval: no masks)."""
        x14, x28 = self.fb(images)
        return self.fh(self.online(x14, x28))


def from_config(model_cfg, num_classes: int, num_train: int) -> TorchScob:
    """The torch Scob that `config.model` (an mlgraph `scob` config) describes, randomly
    initialised as torch does, with a label estimator of `num_train` rows.

    Raises:
      ValueError: a non-ResNet backbone, or settings the official code does not have (a real
        momentum EMA, an exact-identity backbone batch norm; the official code's behaviour
        only).
    """
    unofficial = [
        name
        for name, official in (
            ("faithful_momentum_bug", True),
            ("drifting_backbone_bn", True),
            ("nan_skip_batch", True),
        )
        if bool(model_cfg.get(name, official)) != official
    ]
    if unofficial:
        raise ValueError(
            f"config.model.{unofficial[0]}={model_cfg[unofficial[0]]}: the torch Scob trains "
            "as the official code does (the flag's default)"
        )
    layers, width = resnet_stages(model_cfg, "Scob")
    return TorchScob(
        layers=layers,
        width=width,
        dim=model_cfg.dim,
        heads=model_cfg.num_heads,
        ffn=model_cfg.ffn_dim,
        num_classes=num_classes,
        num_train=num_train,
        num_layers=model_cfg.num_layers,
        dropout=model_cfg.dropout,
        pos_table=model_cfg.pos_table,
    )

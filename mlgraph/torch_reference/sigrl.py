"""SigRL's open-vocabulary model in plain torch, written from docs/sigrl.md §2 with the official
module names (`OV/models/clip_vit.py`), so that its `state_dict()` has the key layout of a
SigRL checkpoint (§2.6, §6): the CLIP tower's parts at the top level (`conv1`,
`class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.i`, `ln_post`,
`projection_dist` = CLIP's `visual.proj`), the unused `projection` MLP, SDA
(`SemanticDecoupling.fc3`), the fusion and VFR (`DecouplingSemantic.fc1/fc3`) and labml's
GATv2 layers (`GATv2_1.layer1/output`, the shared matrix listed as both `linear_l` and
`linear_r`).

Also BiAM's `ranking_lossT` (the copy in MKT's `models/rank_loss.py`), the loss SigRL trains
with, computed as it is (class subset, masked and clamped pair tensor, sign-counted violations).

As the official `CLIPVIT` does with `clip_model.visual`, the student takes a CLIP image tower's
parts (`mlgraph.torch_reference.clip`) and re-wires them (`ln_post` on every token).
"""

from __future__ import annotations

import collections

from mlgraph.torch_reference import require_torch
from mlgraph.torch_reference.clip import VisionTransformer

torch = require_torch()
nn = torch.nn
F = torch.nn.functional

# OpenAI's ViT-B/16 (`clip.load("ViT-B-16.pt")`), SigRL's tower.
VIT_B16 = dict(image=224, patch=16, width=768, layers=12, heads=12, embed=512)


# ---------------------------------------------------------------------------------- GMC (labml)
class GraphAttentionV2Layer(nn.Module):
    """labml's `GraphAttentionV2Layer` with `share_weights=True` (docs/sigrl.md §2.3): `linear_r` is
    `linear_l`, one attention vector `attn` for all heads, LeakyReLU 0.2, softmax over j."""

    def __init__(self, in_features, out_features, n_heads, is_concat=True, dropout=0.6):
        super().__init__()
        self.is_concat = is_concat
        self.n_heads = n_heads
        self.n_hidden = out_features // n_heads if is_concat else out_features
        self.linear_l = nn.Linear(in_features, self.n_hidden * n_heads, bias=False)
        self.linear_r = self.linear_l
        self.attn = nn.Linear(self.n_hidden, 1, bias=False)
        self.activation = nn.LeakyReLU(negative_slope=0.2)
        self.softmax = nn.Softmax(dim=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, adj_mat):
        n = h.shape[0]
        g_l = self.linear_l(h).view(n, self.n_heads, self.n_hidden)
        g_r = self.linear_r(h).view(n, self.n_heads, self.n_hidden)
        # labml's pairing: g_sum[i, j] = g_l[j] + g_r[i].
        g_sum = g_l.repeat(n, 1, 1) + g_r.repeat_interleave(n, dim=0)
        g_sum = g_sum.view(n, n, self.n_heads, self.n_hidden)
        e = self.attn(self.activation(g_sum)).squeeze(-1)
        e = e.masked_fill(adj_mat == 0, float("-inf"))
        a = self.dropout(self.softmax(e))
        out = torch.einsum("ijh,jhf->ihf", a, g_r)
        return out.reshape(n, -1) if self.is_concat else out.mean(dim=1)


class GATv2(nn.Module):
    """labml's two-layer GATv2 as SigRL builds it (`GATv2_1`): dropout, layer1 (concat), ELU,
    dropout, output (1 head)."""

    def __init__(self, in_features, n_hidden, out_features, n_heads, dropout):
        super().__init__()
        self.layer1 = GraphAttentionV2Layer(in_features, n_hidden, n_heads, True, dropout)
        self.activation = nn.ELU()
        self.output = GraphAttentionV2Layer(n_hidden, out_features, 1, True, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, adj_mat):
        x = self.activation(self.layer1(self.dropout(x), adj_mat))
        return self.output(self.dropout(x), adj_mat)


# ------------------------------------------------------------------------------------- SVFR
class SemanticDecoupling(nn.Module):
    """SDA (docs/sigrl.md §2.4a): M_c = Σ_p softmax_p(fc3(tanh(F_p ⊙ H_c))) ⊙ F_p."""

    def __init__(self, dim):
        super().__init__()
        self.fc3 = nn.Linear(dim, dim)

    def forward(self, feats, words):
        """feats F [B, P, D], words H [C, D] -> M [B, C, D]."""
        coefficient = F.softmax(self.fc3(torch.tanh(feats[:, :, None] * words[None, None])), dim=1)
        return (feats[:, :, None] * coefficient).sum(1)


class DecouplingSemantic(nn.Module):
    """The fusion fc1 ([T ‖ Ĥ] -> O, no bias) and VFR (docs/sigrl.md §2.4c-d):
    M̂_p = F_p ⊙ Σ_c softmax_p(fc3(tanh(F_p ⊙ O_c)))."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, dim, bias=False)
        self.fc3 = nn.Linear(dim, dim)

    def reconstruct(self, feats, queries):
        """feats F [B, P, D], queries O [B, C, D] -> M̂ [B, P, D]."""
        x = torch.tanh(feats[:, :, None] * queries[:, None])
        coefficient = F.softmax(self.fc3(x), dim=1)
        return (feats[:, :, None] * coefficient).sum(2)

    def forward(self, feats, fused):
        """feats F [B, P, D], fused [T ‖ Ĥ] [B, C, 2D] -> M̂ [B, P, D]."""
        return self.reconstruct(feats, self.fc1(fused))


def channel_mixing(m, h):
    """docs/sigrl.md §2.4b as the official code writes it, the batch Frobenius norms included:
    Q = normalize(ReLU(Mᵀ H / (‖M‖ ‖H‖)), rows); T = M Q."""
    q = (m.permute(0, 2, 1) @ h) / (m.norm() * h.norm())
    return m @ F.normalize(F.relu(q), dim=-1)


def fused_score(rebuilt, glob, h, topk):
    """docs/sigrl.md §2.5: ½ (s_loc/‖s_loc‖ + s_glob/‖s_glob‖), s_loc = mean of the top-k
    patches of M̂·H."""
    s_loc = torch.topk(rebuilt @ h.t(), k=topk, dim=1)[0].mean(dim=1)
    s_glob = glob @ h.t()
    return (
        s_loc / s_loc.norm(dim=-1, keepdim=True) + s_glob / s_glob.norm(dim=-1, keepdim=True)
    ) / 2


# ------------------------------------------------------------------------------------ CLIPVIT
class CLIPVIT(nn.Module):
    """SigRL's OV model (`models/clip_vit.py`, docs/sigrl.md §2): a CLIP visual tower's parts at
    the top level, the unused `projection` MLP, `projection_dist` (CLIP's proj), SDA, fusion +
    VFR, GATv2."""

    def __init__(self, *, image, patch, width, layers, heads, embed, gat_hidden=128,
                 gat_heads=4, topk=16, dropout=0.3):  # fmt: skip
        super().__init__()
        visual = VisionTransformer(image, patch, width, layers, heads, embed)
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.projection = nn.Sequential(
            collections.OrderedDict(
                [
                    ("fc1", nn.Linear(width, embed)),
                    ("act", nn.Tanh()),
                    ("fc2", nn.Linear(embed, embed)),
                ]
            )
        )
        self.projection_dist = visual.proj
        self.topk = topk
        self.SemanticDecoupling = SemanticDecoupling(embed)
        self.DecouplingSemantic = DecouplingSemantic(embed)
        self.relu = nn.ReLU(inplace=True)
        self.GATv2_1 = GATv2(embed, gat_hidden, embed, gat_heads, dropout)

    def forward_features(self, x):
        """Images [B, 3, H, W] -> every token after ln_post [B, 1 + P, width]."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + x.new_zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)

    def forward(self, x, label_embed):
        """-> (score s [B, C], local F [B, P, E], global g [B, E])."""
        c = label_embed.shape[0]
        adj_mat = label_embed.new_ones(c, c, 1)
        graph = self.GATv2_1(label_embed, adj_mat)
        x = self.forward_features(x)
        glob = x[:, 0] @ self.projection_dist
        feats = x[:, 1:] @ self.projection_dist
        m = self.SemanticDecoupling(feats, label_embed)
        t = channel_mixing(m, label_embed)
        fused = torch.cat((t, graph[None].repeat(t.shape[0], 1, 1)), dim=2)
        rebuilt = self.DecouplingSemantic(feats, fused)
        return fused_score(rebuilt, glob, label_embed, self.topk), feats, glob

    def encode_image(self, x):
        """MKT's modified CLIP `encode_image` on this tower: (patch tokens @ proj, CLS @ proj),
        both after `ln_post` (docs/sigrl.md §3.2; the teacher's CLS output is the target)."""
        x = self.forward_features(x)
        return x[:, 1:] @ self.projection_dist, x[:, 0] @ self.projection_dist


def from_config(model_cfg, image_size: int) -> CLIPVIT:
    """The torch `CLIPVIT` that `config.model` (an mlgraph `sigrl` config) describes, randomly
    initialised as torch does: the tower `clip_vit_b16` (OpenAI's ViT-B/16, or the sizes of
    `backbone_kwargs` with `variant=None`), GMC, top-k and dropout from the config.

    Raises:
      ValueError: another backbone (the torch SigRL is SigRL's CLIP student).
    """
    if model_cfg.backbone != "clip_vit_b16":
        raise ValueError(
            f"config.model.backbone={model_cfg.backbone!r}: the torch SigRL is built for "
            "clip_vit_b16"
        )
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    names = {"width": "width", "depth": "layers", "num_heads": "heads", "patch_size": "patch"}
    sizes = dict(VIT_B16, image=image_size, embed=model_cfg.embed_dim)
    sizes |= {names[k]: v for k, v in kwargs.items() if k in names}
    return CLIPVIT(
        **sizes,
        gat_hidden=model_cfg.gat_hidden,
        gat_heads=model_cfg.gat_heads,
        topk=model_cfg.topk,
        dropout=model_cfg.gat_dropout,
    )


# ------------------------------------------------------------------------------------- losses
def ranking_lossT(scores, labels):
    """BiAM's `ranking_lossT` (MKT's `models/rank_loss.py`; labels +1 / -1 / 0), computed the
    way it is: over the classes with a non-zero label somewhere in the batch, a [B, j, i] tensor
    of 1 + s_j·[y_j = -1] - s_i·[y_i = +1] masked by [y_i = +1]·[y_j = -1] and clamped at 0,
    the violations counted by its sign; the mean over images of sum / (count + 1e-8)."""
    used = labels.abs().sum(0) > 0
    y, s = labels[:, used], scores[:, used]
    pos, neg = y.clamp(0.0, 1.0), (-y).clamp(0.0, 1.0)
    mask = neg[:, :, None] * pos[:, None, :]
    hinge = (mask * (1 + (s * neg)[:, :, None] - (s * pos)[:, None, :])).clamp(min=0)
    return (hinge.sum((1, 2)) / (hinge.sign().sum((1, 2)) + 1e-8)).mean()

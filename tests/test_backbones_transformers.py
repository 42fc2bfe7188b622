"""Parity of the transformer backbones and their converters with plain-torch references.

The torch modules below are written with the sources' key names (timm ViT, OpenAI CLIP,
HF BERT), filled with random weights, converted through the real converter modules, and
compared in float32: max|jax - torch| / max|torch| < 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from mlgraph.convert import bert as bert_convert  # noqa: E402
from mlgraph.convert import (  # noqa: E402
    core,  # noqa: E402
    openai_clip,
    timm_vit,
)
from mlgraph.models.backbones import bert, clip, vit  # noqa: E402
from mlgraph.torch_reference.clip import Transformer, VisionTransformer  # noqa: E402

RTOL = 1e-4


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(model: nn.Module, seed: int, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Give every parameter random values (norm scales near 1) and return the numpy state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1 + noise if ("norm" in name.lower() or "ln_" in name) and p.ndim == 1 and
                    name.endswith(("weight", "gamma")) else noise)  # fmt: skip
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------- timm ViT


class TimmAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d, eps=1e-6), TimmAttention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d, eps=1e-6), TimmMlp(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, patch, patch)


class TimmViT(nn.Module):
    def __init__(self, image=16, patch=4, d=32, depth=2, heads=4, num_classes=5):
        super().__init__()
        grid = image // patch
        self.patch_embed = TimmPatchEmbed(patch, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.blocks = nn.ModuleList([TimmBlock(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)

    def forward_features(self, x, pos_embed=None):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + (self.pos_embed if pos_embed is None else pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def torch_resize(pos_embed: torch.Tensor, size) -> torch.Tensor:
    """timm's resize: bicubic F.interpolate of the grid part, CLS row kept."""
    g = int(round((pos_embed.shape[1] - 1) ** 0.5))
    grid = pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], 1)


@pytest.fixture(scope="module")
def timm_vit_model():
    torch.manual_seed(0)
    model = TimmViT().eval()
    return model, randomize(model, 1)


def test_vit_parity_with_timm_layout(timm_vit_model):
    model, sd = timm_vit_model
    # 32 // 64 == 0 heads by the width rule at this toy width: the option is required.
    with pytest.raises(core.ConversionError, match="cannot split width 32 into 0 heads"):
        timm_vit.convert(sd, {})
    module, settings = timm_vit.convert(sd, {"num_heads": 4})
    assert settings == {
        "kind": "backbone",
        "backbone": None,
        "variant": None,
        "image_size": 16,
        "width": 32,
        "depth": 2,
        "num_heads": 4,
        "patch_size": 4,
        "mlp_ratio": 4.0,
        "num_classes": 5,
    }
    assert module.num_features == 32

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_tokens = model.forward_features(x)
        ref_logits = model.head(ref_tokens[:, 0])
    x_nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    tokens, logits = nnx.jit(lambda m, x: (m(x), m.logits(x)))(module, x_nhwc)
    assert tokens.shape == (2, 17, 32)
    assert rel_err(tokens, ref_tokens) < RTOL
    assert rel_err(logits, ref_logits) < RTOL


def test_vit_heads_rule_and_backbone_name():
    sd = {
        "patch_embed.proj.weight": np.zeros((768, 3, 16, 16), np.float32),
        "pos_embed": np.zeros((1, 197, 768), np.float32),
        "cls_token": np.zeros((1, 1, 768), np.float32),
    }
    for i in range(12):
        sd[f"blocks.{i}.mlp.fc1.weight"] = np.zeros((3072, 768), np.float32)
    settings = timm_vit.infer_settings(sd, include_head=False, image_size=448)
    assert settings["backbone"] == "vit_b16" and settings["variant"] == "B/16"
    assert (settings["num_heads"], settings["image_size"], settings["num_classes"]) == (
        12,
        448,
        None,
    )


def test_vit_resized_checkpoint_without_head(timm_vit_model):
    model, sd = timm_vit_model
    module, settings = timm_vit.convert(
        sd, {"num_heads": 4, "include_head": False, "image_size": 24}
    )
    assert module.head is None and settings["num_classes"] is None
    assert settings["image_size"] == 24 and module.pos_embed.shape == (1, 37, 32)
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.forward_features(x, pos_embed=torch_resize(model.pos_embed, (6, 6)))
    err = rel_err(nnx.jit(lambda m, x: m(x))(module, x.permute(0, 2, 3, 1).numpy()), ref)
    assert err < RTOL, err


def test_vit_conversion_reports_missing_and_unexpected_keys(timm_vit_model):
    _, sd = timm_vit_model
    broken = dict(sd)
    del broken["blocks.1.attn.qkv.bias"]
    broken["dist_token"] = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(core.ConversionError) as info:
        timm_vit.convert(broken, {"num_heads": 4})
    message = str(info.value)
    assert "missing keys (1): blocks.1.attn.qkv.bias" in message
    assert "unexpected keys (1): dist_token" in message
    with pytest.raises(core.ConversionError, match="unknown options bogus"):
        timm_vit.convert(sd, {"bogus": 1})


# 14 -> 28 and 14 -> 36 are SALGL's 224 -> 448 and 224 -> 576; 7 -> (5, 9) shrinks one side.
@pytest.mark.parametrize(
    "grid,new", [(7, (12, 12)), (7, (5, 9)), (14, (28, 28)), (14, (36, 36)), (4, (4, 4))]
)
def test_resize_pos_embed_matches_torch_bicubic(grid, new):
    pe = torch.randn(1, 1 + grid * grid, 8, generator=torch.Generator().manual_seed(grid))
    ours = vit.resize_pos_embed(pe.numpy(), new)
    ref = torch_resize(pe, new).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours[:, 0], ref[:, 0])
    # torch computes in float32, ours in float64 (measured <= 1.1e-6); jax.image.resize's
    # Keys kernel (A = -0.5) is off by 0.06-0.3 here.
    assert rel_err(ours, ref) < 1e-5


# -------------------------------------------------------------------------------- OpenAI CLIP
# The image tower's blocks are `mlgraph.torch_reference.clip`'s (SigRL's student uses them too).


class TorchCLIP(nn.Module):
    """OpenAI's `CLIP` key layout (ViT image tower), small sizes."""

    def __init__(self, embed=16, image=16, patch=4, vwidth=32, vlayers=2, ctx=12, vocab=50,
                 twidth=24, theads=3, tlayers=2):  # fmt: skip
        super().__init__()
        self.visual = VisionTransformer(image, patch, vwidth, vlayers, vwidth // 8, embed)
        mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
        self.transformer = Transformer(twidth, tlayers, theads, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab, twidth)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, twidth))
        self.ln_final = nn.LayerNorm(twidth)
        self.text_projection = nn.Parameter(torch.zeros(twidth, embed))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def encode_text(self, text):
        """-> (token features after ln_final, EOT feature @ text_projection)."""
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x, x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


@pytest.fixture(scope="module")
def torch_clip():
    torch.manual_seed(0)
    model = TorchCLIP().eval()
    return model, randomize(model, 4)


def test_clip_image_tower_parity(torch_clip):
    model, sd = torch_clip
    # 32 // 64 == 0 heads by OpenAI's rule at this toy width: the option gives the 4 heads.
    module, settings = openai_clip.convert(sd, {"num_heads": 4})
    assert settings == {
        "kind": "backbone",
        "backbone": None,
        "variant": None,
        "image_size": 16,
        "width": 32,
        "depth": 2,
        "num_heads": 4,
        "patch_size": 4,
        "embed_dim": 16,
    }
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_tokens, ref_feats = model.visual(x)
    x_nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    run = nnx.jit(lambda m, x: (m(x), m.encode_image(x), m.project(m(x))))
    tokens, feats, projected = run(module, x_nhwc)
    assert tokens.shape == (2, 17, 32) and module.num_features == 32
    assert rel_err(tokens, ref_tokens) < RTOL
    assert rel_err(feats, ref_feats) < RTOL
    assert rel_err(projected[:, 0], ref_feats) < RTOL


def test_clip_text_tower_parity(torch_clip):
    model, sd = torch_clip
    module, settings = openai_clip.convert(sd, {"tower": "text", "num_heads": 3})
    assert settings == {
        "kind": "text_encoder",
        "backbone": None,
        "encoder": "clip",
        "width": 24,
        "depth": 2,
        "num_heads": 3,
        "embed_dim": 16,
        "context_length": 12,
        "vocab_size": 50,
    }
    # <sot>=48 ... <eot>=49 then zero padding, EOT at different positions.
    ids = np.zeros((3, 12), np.int64)
    for row, n in enumerate((3, 7, 9)):
        ids[row, 0] = 48
        ids[row, 1 : n + 1] = np.random.default_rng(row).integers(1, 48, n)
        ids[row, n + 1] = 49
    with torch.no_grad():
        ref_tokens, ref_feats = model.encode_text(torch.from_numpy(ids))
    run = nnx.jit(lambda m, ids: (m(ids), m.encode_text(ids), m.encode_text(ids[:, :11])))
    tokens, feats, short = run(module, jnp.asarray(ids))
    assert rel_err(tokens, ref_tokens) < RTOL
    assert rel_err(feats, ref_feats) < RTOL
    # The mask is causal, so dropping the trailing padding changes nothing.
    assert rel_err(short, ref_feats) < RTOL


def test_clip_heads_rule_and_resnet_refused(torch_clip):
    _, sd = torch_clip
    assert (
        openai_clip.infer_text_settings({**sd, "ln_final.weight": np.zeros(512)})["num_heads"] == 8
    )
    with pytest.raises(core.ConversionError, match="cannot split width 32 into 0 heads"):
        openai_clip.convert(sd, {})
    with pytest.raises(core.ConversionError, match="ResNet CLIP"):
        openai_clip.convert({**sd, "visual.layer1.0.conv1.weight": np.zeros(1)}, {})


# ----------------------------------------------------------------------------------------- BERT


class BertSelfAttention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class BertDenseNorm(nn.Module):
    def __init__(self, cin, h):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(cin, h), nn.LayerNorm(h, eps=1e-12)


class BertAttention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.self, self.output = BertSelfAttention(h), BertDenseNorm(h, h)


class BertIntermediate(nn.Module):
    def __init__(self, h, inter):
        super().__init__()
        self.dense = nn.Linear(h, inter)


class BertLayer(nn.Module):
    def __init__(self, h, inter, heads):
        super().__init__()
        self.heads = heads
        self.attention = BertAttention(h)
        self.intermediate = BertIntermediate(h, inter)
        self.output = BertDenseNorm(inter, h)

    def forward(self, x, mask):
        b, n, h = x.shape
        s = self.attention.self
        split = lambda t: t.reshape(b, n, self.heads, h // self.heads).transpose(1, 2)
        q, k, v = split(s.query(x)), split(s.key(x)), split(s.value(x))
        scores = q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5
        scores = scores + (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h)
        out = self.attention.output
        x = out.LayerNorm(x + out.dense(ctx))
        y = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(y))


class BertEmbeddings(nn.Module):
    def __init__(self, vocab, h, positions, types):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, h)
        self.position_embeddings = nn.Embedding(positions, h)
        self.token_type_embeddings = nn.Embedding(types, h)
        self.LayerNorm = nn.LayerNorm(h, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(positions)[None])


class BertEncoderLayers(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertPooler(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.dense = nn.Linear(h, h)


class TorchBert(nn.Module):
    """HF `BertModel` key layout, small sizes."""

    def __init__(self, vocab=40, h=24, layers=2, heads=6, inter=48, positions=16, types=2):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, h, positions, types)
        self.encoder = BertEncoderLayers([BertLayer(h, inter, heads) for _ in range(layers)])
        self.pooler = BertPooler(h)

    def forward(self, ids, mask, types):
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, : ids.shape[1]])
        x = e.LayerNorm(x + e.token_type_embeddings(types))
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


@pytest.fixture(scope="module")
def torch_bert():
    torch.manual_seed(0)
    model = TorchBert().eval()
    return model, randomize(model, 6)


def bert_inputs():
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 40, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = np.zeros((3, 9), np.int64)
    types[0, 5:] = 1
    return ids, mask, types


def test_bert_parity(torch_bert):
    model, sd = torch_bert
    module, settings = bert_convert.convert(sd, {"num_heads": 6})
    assert settings == {
        "kind": "text_encoder",
        "backbone": None,
        "encoder": "bert",
        "vocab_size": 40,
        "hidden": 24,
        "depth": 2,
        "num_heads": 6,
        "intermediate": 48,
        "max_positions": 16,
        "type_vocab_size": 2,
    }
    ids, mask, types = bert_inputs()
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in (ids, mask, types)))
        m = torch.from_numpy(mask).float()[..., None]
        ref_pool = (ref * m).sum(1) / m.sum(1).clamp(min=1e-9)
    hidden = nnx.jit(lambda m, *a: m(*a))(module, ids, mask, types)
    assert rel_err(hidden, ref) < RTOL
    assert rel_err(bert.mean_pool(hidden, jnp.asarray(mask)), ref_pool) < RTOL


def test_bert_prefixed_gamma_beta_checkpoint(torch_bert):
    """A `BertForMaskedLM`-style file: `bert.` prefix, LayerNorm gamma/beta, `cls.*` heads."""
    model, sd = torch_bert
    old = {}
    for key, value in sd.items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        old[f"bert.{key}"] = value
    old["cls.predictions.bias"] = np.zeros(40, np.float32)
    module, settings = bert_convert.convert(old, {"num_heads": 6})
    ids, mask, types = bert_inputs()
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in (ids, mask, types)))
    assert rel_err(nnx.jit(lambda m, *a: m(*a))(module, ids, mask, types), ref) < RTOL
    # Without the option, 24 is not a standard width: 24 // 64 = 0 heads is refused.
    with pytest.raises(core.ConversionError, match="pass the option num_heads"):
        bert_convert.convert(old, {})


def test_bert_standard_heads():
    shapes = {
        "embeddings.word_embeddings.weight": (30522, 384),
        "embeddings.position_embeddings.weight": (512, 384),
        "embeddings.token_type_embeddings.weight": (2, 384),
        "encoder.layer.0.intermediate.dense.weight": (1536, 384),
    }
    sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    assert bert_convert.infer_settings(sd)["num_heads"] == 12


def param_count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_size_parameter_counts():
    """Built abstractly; the counts are those of timm / OpenAI / HF for the same models."""
    from mlgraph.models import backbones

    def abstract(fn):
        return nnx.eval_shape(lambda: fn(rngs=nnx.Rngs(0)))

    b16 = abstract(
        lambda rngs: backbones.build("vit_b16", image_size=224, num_classes=1000, rngs=rngs)
    )
    assert (param_count(b16), b16.num_features) == (86_567_656, 768)  # vit_base_patch16_224
    l16 = abstract(lambda rngs: backbones.build("vit_l16", image_size=448, rngs=rngs))
    assert l16.pos_embed.shape == (1, 785, 1024) and l16.num_features == 1024
    # timm vit_large_patch16_224 (304,326,632) - head (1,025,000) + 588 more positions x 1024.
    assert param_count(l16) == 303_903_744
    assert param_count(abstract(lambda rngs: clip.create(rngs=rngs))) == 86_192_640
    minilm = abstract(lambda rngs: bert.create(vocab_size=30522, rngs=rngs))
    assert param_count(minilm) == 22_565_376  # the safetensors file minus pooler.*

"""SigRL (ICME 2025): CLIP ViT-B/16 adapted to open-vocabulary and single-positive multi-label
recognition with a label graph (GMC) and semantic visual feature reconstruction (SVFR)
(docs/sigrl.md §2-§4).

    image tower -> tokens after ln_post -> @ proj: global g [B, E], local F [B, P, E]
    label embeddings H [C, E] of the *queried* label set (frozen text features)
    GMC: two GATv2 layers over the fully connected label graph -> Ĥ [C, E]
    SDA: M[b, c] = Σ_p softmax_p(W_s tanh(F_p ⊙ H_c) + b_s) ⊙ F_p            [B, C, E]
    Q = row-L2-normalised ReLU(Mᵀ H); T = M Q; O = [T ‖ Ĥ] W_o                  [B, C, E]
    VFR: M̂_p = F_p ⊙ Σ_c softmax_p(W_v tanh(F_p ⊙ O_c) + b_v)                  [B, P, E]
    s = ½ (s_loc / ‖s_loc‖ + s_glob / ‖s_glob‖), s_loc = mean top-16_p ⟨M̂_p, H_c⟩, s_glob = ⟨g, H_c⟩

Scores depend on the queried set (the GAT, Σ_c in Q and VFR, the norm over classes), so the
label set is an input of the forward pass: `label_ids` picks rows of the label-embedding table
(all classes by default). SDA and VFR are scans over class chunks of `class_chunk` labels with
`jax.checkpoint` on the chunk body, so the [B, P, C, E] intermediates never exist whole (§3.6);
the softmax is over patches, so chunking over classes is exact.

Backbones: `clip_vit_b16` (CLS token = global, patches = local, CLIP's `proj` the trainable
projection, as SigRL) or any token backbone (global = mean of the tokens; a learned projection
`proj` [D, E] into the label-embedding space; the demo's MobileNetV2).

Training (OV, `config.loss.name = 'sigrl'`): BiAM's ranking loss over the seen labels plus L1
distillation of g to a frozen teacher's CLS embedding (§3.1-§3.2). The teacher shares the
student's frozen trunk (blocks before `teacher_from_block`, computed once) and keeps frozen
copies of the later blocks, `ln_post` and `proj` (`teacher/...`, filled from the backbone when
the CLIP weights are loaded: `Model.weights_loaded`). Images without a seen positive are left
out of the step's loss (SigRL drops them from the batch). SPML (`config.loss.name` one of the
single-positive losses, e.g. 'em'): the same model, logits = s, the observed single positives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mlgraph import losses, metrics, optim
from mlgraph.errors import ConfigError
from mlgraph.labels.embeddings import load_embeddings
from mlgraph.models import backbones
from mlgraph.models.common import NO_KWARGS, Buffer
from mlgraph.models.layers import torch_linear, uniform_init

OV_LOSS = "sigrl"


# ---------------------------------------------------------------------------------------------
# GMC: labml's GATv2 layer (shared source/target weights, one attention vector for all heads)
# ---------------------------------------------------------------------------------------------
class GATv2Layer(nnx.Module):
    """labml's `GraphAttentionV2Layer` with `share_weights=True` over a fully connected graph.

    e^k_ij = a · LeakyReLU_0.2(U^k_i + U^k_j) with U = x Wᵀ split into heads; α = softmax_j e,
    dropout on α; out_i = concat_k (or mean_k) Σ_j α^k_ij U^k_j. The attention vector `attn`
    [hidden] is shared by the heads (labml's `attn = nn.Linear(n_hidden, 1)`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_heads: int,
        *,
        concat: bool,
        dropout: float,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if concat and out_features % num_heads:
            raise ValueError(f"GATv2: {out_features} features do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.concat = concat
        self.hidden = out_features // num_heads if concat else out_features
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = torch_linear(in_features, self.hidden * num_heads, use_bias=False, **kw)
        bound = 1.0 / math.sqrt(self.hidden)
        self.attn = nnx.Param(uniform_init(bound)(rngs.params(), (self.hidden,), param_dtype))
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs=None) -> jax.Array:
        """Node features [C, in] -> [C, out]."""
        c = x.shape[0]
        u = self.linear(x).reshape(c, self.num_heads, self.hidden)
        pair = jax.nn.leaky_relu(u[:, None] + u[None, :], negative_slope=0.2)  # [C, C, K, h]
        e = jnp.einsum("ijkh,h->ijk", pair, self.attn[...].astype(pair.dtype))
        a = jax.nn.softmax(e.astype(jnp.float32), axis=1).astype(u.dtype)
        a = self.dropout(a, deterministic=deterministic, rngs=rngs)
        out = jnp.einsum("ijk,jkh->ikh", a, u)
        return out.reshape(c, -1) if self.concat else out.mean(axis=1)


class GMC(nnx.Module):
    """SigRL's `GATv2_1`: dropout -> GATv2 (4 heads x 32, concat) -> ELU -> dropout -> GATv2
    (1 head x E) (labml's two-layer GATv2 model, docs/sigrl.md §2.3)."""

    def __init__(self, dim: int, hidden: int, heads: int, dropout: float, *, rngs, **kw):
        self.layer1 = GATv2Layer(dim, hidden, heads, concat=True, dropout=dropout, rngs=rngs, **kw)
        self.output = GATv2Layer(hidden, dim, 1, concat=False, dropout=dropout, rngs=rngs, **kw)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, h: jax.Array, *, deterministic: bool, rngs=None) -> jax.Array:
        """Label embeddings [C, E] -> Ĥ [C, E]."""
        kw = dict(deterministic=deterministic, rngs=rngs)
        x = self.dropout(h, **kw)
        x = jax.nn.elu(self.layer1(x, **kw))
        x = self.dropout(x, **kw)
        return self.output(x, **kw)


# ---------------------------------------------------------------------------------------------
# SDA, channel mixing, VFR: chunked over classes
# ---------------------------------------------------------------------------------------------
def _class_attention(feats: jax.Array, queries: jax.Array, kernel: jax.Array, bias: jax.Array):
    """softmax over patches of W tanh(F_p ⊙ q_c) + b: [B, P, k, E] for queries [B|1, k, E]."""
    x = jnp.tanh(feats[:, :, None, :] * queries[:, None, :, :])
    logits = jnp.einsum("bpke,ef->bpkf", x, kernel) + bias
    return jax.nn.softmax(logits.astype(jnp.float32), axis=1).astype(feats.dtype)


def _chunks(queries: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Queries [B, C, E] as [n, B, chunk, E] (zero-padded) and the valid mask [n, chunk]."""
    b, c, e = queries.shape
    n = -(-c // chunk)
    padded = jnp.pad(queries, ((0, 0), (0, n * chunk - c), (0, 0)))
    valid = (jnp.arange(n * chunk) < c).reshape(n, chunk)
    return padded.reshape(b, n, chunk, e).transpose(1, 0, 2, 3), valid


def semantic_decoupling(
    feats: jax.Array,
    queries: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    chunk: int = 0,
    with_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """SDA (docs/sigrl.md §2.4a): M[b, c] = Σ_p softmax_p(W tanh(F_p ⊙ H_c) + b) ⊙ F_p.

    Args:
      feats: F [B, P, E]; queries: H [B or 1, C, E]; kernel [E, E] and bias [E] (W_s, b_s).
      chunk: classes per scan step (0 = all at once, the [B, P, C, E] tensor materialised).
      with_weights: also return each label's patch weights, the softmax weights a[b, p, c, d]
        averaged over the E channels: [B, C, P] float32, summing to 1 over the patches as each
        channel's do.
    Returns:
      M [B, C, E] (and the weights).
    """
    queries = jnp.broadcast_to(queries, (feats.shape[0], *queries.shape[1:]))

    def pooled(q):
        att = _class_attention(feats, q, kernel, bias)
        m = jnp.einsum("bpke,bpe->bke", att, feats)
        if not with_weights:
            return m
        return m, att.astype(jnp.float32).mean(axis=-1).transpose(0, 2, 1)

    if not chunk or chunk >= queries.shape[1]:
        return pooled(queries)
    chunks, _ = _chunks(queries, chunk)
    out = jax.lax.map(jax.checkpoint(pooled), chunks)  # [n, B, chunk, ...]
    b, c, _ = queries.shape

    def unchunk(x):
        return jnp.moveaxis(x, 0, 1).reshape(b, -1, *x.shape[3:])[:, :c]

    return jax.tree.map(unchunk, out)


def feature_reconstruction(
    feats: jax.Array, queries: jax.Array, kernel: jax.Array, bias: jax.Array, chunk: int = 0
) -> jax.Array:
    """VFR (docs/sigrl.md §2.4d): M̂_p = F_p ⊙ Σ_c softmax_p(W tanh(F_p ⊙ O_c) + b).

    Args:
      feats: F [B, P, E]; queries: O [B, C, E]; kernel [E, E], bias [E] (W_v, b_v).
      chunk: classes per scan step (0 = all at once).
    Returns:
      M̂ [B, P, E].
    """
    if not chunk or chunk >= queries.shape[1]:
        return feats * _class_attention(feats, queries, kernel, bias).sum(axis=2)

    @jax.checkpoint
    def body(total, chunk_and_valid):
        q, valid = chunk_and_valid
        att = _class_attention(feats, q, kernel, bias)
        return total + jnp.einsum("bpke,k->bpe", att, valid.astype(att.dtype)), None

    chunks, valid = _chunks(queries, chunk)
    total, _ = jax.lax.scan(body, jnp.zeros_like(feats), (chunks, valid))
    return feats * total


def channel_mixing(m: jax.Array, h: jax.Array) -> jax.Array:
    """T = M Q with Q = row-L2-normalised ReLU(Mᵀ H) (docs/sigrl.md §2.4b; the official division
    by the batch's Frobenius norms cancels in the normalisation): M [B, C, E], H [C, E] ->
    [B, C, E]."""
    s = jax.nn.relu(jnp.einsum("bcd,ce->bde", m, h).astype(jnp.float32))
    q = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("bcd,bde->bce", m, q.astype(m.dtype))


def fused_scores(local: jax.Array, glob: jax.Array, h: jax.Array, topk: int) -> jax.Array:
    """s = ½ (s_loc/‖s_loc‖ + s_glob/‖s_glob‖), norms over classes, no epsilon (docs/sigrl.md §2.5).

    Args:
      local: M̂ [B, P, E]; glob: g [B, E]; h: H [C, E]; topk: patches averaged per class.
    """
    per_patch = jnp.einsum("bpe,ce->bcp", local, h).astype(jnp.float32)
    s_loc = jax.lax.top_k(per_patch, min(topk, per_patch.shape[-1]))[0].mean(axis=-1)
    s_glob = jnp.einsum("be,ce->bc", glob, h).astype(jnp.float32)
    unit = lambda s: s / jnp.linalg.norm(s, axis=-1, keepdims=True)  # noqa: E731
    return 0.5 * (unit(s_loc) + unit(s_glob))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class Teacher(nnx.Module):
    """The frozen CLIP teacher's blocks from `start` on, its `ln_post` and `proj`
    (docs/sigrl.md §3.2)."""

    def __init__(self, tower, start: int, *, rngs: nnx.Rngs):
        from mlgraph.models.backbones import clip

        width, heads = tower.num_features, tower.transformer.resblocks[0].attn.num_heads
        kw = dict(dtype=tower.dtype, param_dtype=tower.proj[...].dtype, rngs=rngs)
        depth = len(tower.transformer.resblocks)
        self.resblocks = nnx.List(
            [clip.ResidualAttentionBlock(width, heads, **kw) for _ in range(start, depth)]
        )
        self.ln_post = nnx.LayerNorm(width, epsilon=1e-5, **kw)
        self.proj = nnx.Param(jnp.zeros(tower.proj.shape, tower.proj[...].dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Tokens after the shared trunk [B, N, W] -> the teacher's CLS embedding [B, E]."""
        for block in self.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj[...].astype(x.dtype)


class SigRL(nnx.Module):
    """CLIP tower (or any token backbone) + GMC + SVFR + fused scores over a queried label set."""

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        backbone: str = "clip_vit_b16",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
        frozen_bn: bool = True,
        embed_path: str = "",
        embed_dim: int = 512,
        gat_hidden: int = 128,
        gat_heads: int = 4,
        gat_dropout: float = 0.3,
        topk: int = 16,
        class_chunk: int = 64,
        distill: bool = True,
        teacher_from_block: int = 10,
    ):
        """Args (the `config.model` fields):
        backbone, backbone_kwargs: the token backbone (`clip_vit_b16`: SigRL's tower).
        frozen_bn: a CNN backbone's batch norm keeps its running statistics.
        embed_path: label embeddings [C, E] (a .npy from `python -m mlgraph.labels`, e.g.
          CLIP ViT-B/16 text features of "There is a {} in the scene"; "minilm" for the
          offline MiniLM vectors); '' = zeros, filled by a converted checkpoint.
        embed_dim: E, the label-embedding width (checked against the file; CLIP's `proj`).
        gat_hidden, gat_heads, gat_dropout: GMC's first layer (128 = 4 heads x 32), dropout.
        topk: patches averaged in the local score (16).
        class_chunk: classes per SDA/VFR scan step (0 = unchunked).
        distill: build the frozen teacher (OV training's L1 distillation; CLIP only).
        teacher_from_block: first block the teacher does not share with the student (SigRL's
          fix_layer: blocks before it are frozen in the student, so the trunk is shared).
        """
        kw = dict(dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.backbone = backbones.build(
            backbone, image_size=image_size, dtype=dtype, rngs=rngs, **backbone_kwargs
        )
        self.clip = hasattr(self.backbone, "proj")
        if self.clip:
            if self.backbone.embed_dim != embed_dim:
                raise ConfigError(
                    f"config.model.embed_dim={embed_dim}: the CLIP tower projects to "
                    f"{self.backbone.embed_dim}"
                )
        else:
            bound = 1.0 / math.sqrt(self.backbone.num_features)
            self.proj = nnx.Param(
                uniform_init(bound)(rngs.params(), (self.backbone.num_features, embed_dim))
            )
        table = (
            load_embeddings(embed_path, num_classes, embed_dim)
            if embed_path
            else np.zeros((num_classes, embed_dim), np.float32)
        )
        self.label_embeddings = Buffer(jnp.asarray(table, jnp.float32))
        self.embed_path = embed_path
        self.gmc = GMC(embed_dim, gat_hidden, gat_heads, gat_dropout, **kw)
        self.sda = torch_linear(embed_dim, embed_dim, **kw)
        self.fuse = torch_linear(2 * embed_dim, embed_dim, use_bias=False, **kw)
        self.vfr = torch_linear(embed_dim, embed_dim, **kw)
        self.topk = int(topk)
        self.class_chunk = int(class_chunk)
        self.frozen_bn = bool(frozen_bn)
        self.teacher_from_block = int(teacher_from_block)
        self.distill = bool(distill)
        if self.distill:
            if not self.clip:
                raise ConfigError(
                    f"config.model.distill=True needs a CLIP tower (backbone 'clip_vit_b16'), "
                    f"not {backbone!r}; set config.model.distill=False"
                )
            depth = len(self.backbone.transformer.resblocks)
            if not 0 <= self.teacher_from_block <= depth:
                raise ConfigError(
                    f"config.model.teacher_from_block={teacher_from_block}: expected 0..{depth}"
                )
            self.teacher = Teacher(self.backbone, self.teacher_from_block, rngs=rngs)

    # -- weights ------------------------------------------------------------------------------
    def weights_loaded(self) -> None:
        """After `mlgraph.init_from` filled in weights: the label embeddings of `embed_path`
        win over a checkpoint's table (a converted SigRL file has none: SigRL reads
        `label_emb.pt` apart), and the teacher takes the loaded CLIP tower's later blocks,
        `ln_post` and `proj`.

        Raises:
          ConfigError: no `embed_path` and the loaded table is all zeros (every score NaN).
        """
        c, e = self.label_embeddings.shape
        if self.embed_path:
            table = load_embeddings(self.embed_path, c, e)
            self.label_embeddings.set_value(jnp.asarray(table, jnp.float32))
        elif not bool(jnp.any(self.label_embeddings[...] != 0)):
            raise ConfigError(
                "config.model.embed_path: the loaded weights hold no label embeddings (all "
                "zero); give the class names' text features, e.g. python -m "
                "mlgraph.labels --encoder clip ... --output E.npy"
            )
        self.fill_teacher()

    def fill_teacher(self) -> None:
        """The teacher (with `distill`): copies of the tower's blocks from
        `teacher_from_block` on, its `ln_post` and `proj` (SigRL's second load of the same CLIP
        weights)."""
        if not self.distill:
            return
        blocks = self.backbone.transformer.resblocks[self.teacher_from_block :]
        for src, dst in zip(blocks, self.teacher.resblocks, strict=True):
            nnx.update(dst, jax.tree.map(jnp.copy, nnx.state(src)))
        nnx.update(self.teacher.ln_post, jax.tree.map(jnp.copy, nnx.state(self.backbone.ln_post)))
        self.teacher.proj.set_value(jnp.copy(self.backbone.proj[...]))

    # -- forward ------------------------------------------------------------------------------
    def _trunk(self, images: jax.Array) -> jax.Array:
        """CLIP tokens after the blocks shared with the teacher (before `teacher_from_block`)."""
        t = self.backbone
        x = t.conv1(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(t.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + t.positional_embedding[...].astype(x.dtype)
        x = t.ln_pre(x)
        for block in t.transformer.resblocks[: self.teacher_from_block]:
            x = block(x)
        return x

    def features(self, images: jax.Array, *, train: bool = False, teacher: bool = False):
        """(g [B, E], F [B, P, E], the teacher's CLS embedding [B, E] or None)."""
        if not self.clip:
            tokens = self.backbone(images, train=train and not self.frozen_bn)
            proj = self.proj[...].astype(tokens.dtype)
            return tokens.mean(axis=1) @ proj, tokens @ proj, None
        t = self.backbone
        shared = self._trunk(images)
        x = shared
        for block in t.transformer.resblocks[self.teacher_from_block :]:
            x = block(x)
        z = t.project(t.ln_post(x))
        g_teacher = None
        if teacher:
            g_teacher = jax.lax.stop_gradient(self.teacher(jax.lax.stop_gradient(shared)))
        return z[:, 0], z[:, 1:], g_teacher

    def __call__(
        self,
        images: jax.Array,
        *,
        labels=None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
        label_ids: jax.Array | None = None,
        label_embeddings: jax.Array | None = None,
        teacher: bool = False,
        sow_weights: bool = False,
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> {'logits' [B, C'] (the fused score s), 'global' g,
        'teacher' (with `teacher=True`)} for the queried labels: `label_embeddings` [C', E]
        given directly, else the table's rows `label_ids` (default: every class).

        `sow_weights`: SDA keeps each queried label's patch weights [B, C', P] (its softmax
        over the patches, averaged over the channels; `semantic_decoupling`) as the
        `nnx.Intermediate` 'sda_weights' (`mlgraph.viz.attention` reads them)."""
        del labels
        h = label_embeddings
        if h is None:
            h = self.label_embeddings[...]
            if label_ids is not None:
                h = h[jnp.asarray(label_ids)]
        h = h.astype(self.dtype)
        glob, local, g_teacher = self.features(images, train=train, teacher=teacher)
        h_graph = self.gmc(h, deterministic=not train or rngs is None, rngs=rngs)
        sda, fuse, vfr = self.sda, self.fuse, self.vfr
        m = semantic_decoupling(
            local, h[None], sda.kernel[...], sda.bias[...], self.class_chunk, sow_weights
        )
        if sow_weights:
            m, weights = m
            self.sow(nnx.Intermediate, "sda_weights", weights)
        t = channel_mixing(m, h)
        o = jnp.concatenate([t, jnp.broadcast_to(h_graph, t.shape)], axis=-1) @ fuse.kernel[...]
        rebuilt = feature_reconstruction(local, o, vfr.kernel[...], vfr.bias[...], self.class_chunk)
        out = {"logits": fused_scores(rebuilt, glob, h, self.topk), "global": glob}
        if g_teacher is not None:
            out["teacher"] = g_teacher
        return out


Model = SigRL


# ---------------------------------------------------------------------------------------------
# Parameter groups: layer-wise lr decay and the frozen set (docs/sigrl.md §3.4)
# ---------------------------------------------------------------------------------------------
EMBEDDING_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre")


def layer_id(path: str, depth: int) -> int:
    """BEiT-style layer id of a parameter path: the CLIP tower's embedding parts 0, block i
    i + 1, everything else (ln_post, proj, the heads) depth + 1; a CNN backbone counts as one
    layer (0)."""
    parts = path.split("/")
    if parts[0] != "backbone":
        return depth + 1
    if parts[1] in EMBEDDING_PARTS:
        return 0
    if parts[1] == "transformer":
        return int(parts[3]) + 1
    if parts[1] in ("ln_post", "proj"):
        return depth + 1
    return 0


def frozen_patterns(fix_layer: int, depth: int = 12, cnn: bool = False) -> tuple[str, ...]:
    """`config.optimizer.frozen` for SigRL's `fix_layer`: every parameter whose layer id is at
    most `fix_layer` (CLIP: the patch embedding, class/positional embeddings, ln_pre and blocks
    0..fix_layer-1), and the teacher. `cnn=True`: the whole CNN backbone (id 0)."""
    if cnn:
        return ("backbone/.*", "teacher/.*")
    blocks = "|".join(str(i) for i in range(min(fix_layer, depth)))
    out = [f"backbone/({'|'.join(EMBEDDING_PARTS)})(/.*)?"]
    if blocks:
        out.append(f"backbone/transformer/resblocks/({blocks})/.*")
    return (*out, "teacher/.*")


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in p)


def _groups(params: nnx.State) -> nnx.State:
    """Each trainable parameter's group 'l<id>_decay' / 'l<id>_no_decay' (matrices decayed,
    vectors not: MKT's `param_groups_lrd`). GMC's attention vectors count as matrices: SigRL's
    are `nn.Linear(h, 1)` weights [1, h], decayed (docs/sigrl.md §3.4), held here as vectors [h]."""
    depth = _depth(params)

    def label(path, value):
        name = _path(path)
        matrix = value.ndim >= 2 or (name.startswith("gmc/") and name.endswith("/attn"))
        return f"l{layer_id(name, depth)}_{'decay' if matrix else 'no_decay'}"

    return nnx.map_state(label, params)


def _depth(params: nnx.State) -> int:
    flat = nnx.to_flat_state(params)
    ids = [int(p[3]) for p, _ in flat if tuple(map(str, p[:3])) == _BLOCKS]
    return max(ids) + 1 if ids else 0


_BLOCKS = ("backbone", "transformer", "resblocks")


class LayerDecayAdamW:
    """AdamW over the trainable parameters (those `config.optimizer.frozen` does not match),
    one group per layer id and decay kind: lr x layer_decay^(depth + 1 - id), weight decay on
    matrices only (SigRL's `param_groups_lrd` + torch AdamW). Frozen parameters have no
    optimizer state and are never differentiated (`split`)."""

    def __init__(self, config: ml_collections.ConfigDict, total_steps: int, params: nnx.State):
        opt = config.optimizer
        self.opt = opt
        trainable = self.split(params)[0]
        depth = _depth(params)
        labels = _groups(trainable)
        lr = optim.learning_rate_fn(opt, total_steps)
        decay = float(opt.get("layer_decay", 1.0))
        transforms, self.scales = {}, {}
        for group in sorted(set(jax.tree.leaves(labels))):
            lid, kind = group[1:].split("_", 1)
            scale = decay ** (depth + 1 - int(lid))
            self.scales[group] = scale
            wd = opt.weight_decay if kind == "decay" else 0.0
            transforms[group] = optax.inject_hyperparams(optax.adamw)(
                learning_rate=lambda s, scale=scale: lr(s) * scale,
                b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd,
            )  # fmt: skip
        self.tx = optax.multi_transform(transforms, labels)

    def split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) parameters."""
        frozen, trainable = optim.split_frozen(params, self.opt)
        return trainable, frozen

    def init(self, params: nnx.State):
        """The optimizer state of the trainable parameters."""
        return self.tx.init(self.split(params)[0])

    def update(self, grads, state, params):
        """optax's update over the trainable parameters."""
        return self.tx.update(grads, state, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, params: nnx.State):
    """`LayerDecayAdamW` (SigRL's OV recipe; `config.optimizer.layer_decay` 1 = none)."""
    if config.optimizer.name != "adamw" and config.optimizer.get("layer_decay", 1.0) != 1.0:
        raise ConfigError(
            f"config.optimizer.name={config.optimizer.name!r}: layer-wise decay is built for "
            "'adamw' (SigRL's recipe); set config.optimizer.layer_decay=1.0 for another"
        )
    if config.optimizer.name == "adamw":
        return LayerDecayAdamW(config, total_steps, params)
    return _Trainable(config, total_steps, params)


class _Trainable(LayerDecayAdamW):
    """The loop's optimizer of `config.optimizer` (e.g. SPML's Adam) over the trainable
    parameters only."""

    def __init__(self, config, total_steps, params):
        self.opt = config.optimizer
        opt = ml_collections.ConfigDict(config.optimizer.to_dict())
        opt.frozen, opt.lr_mults = (), ()
        self.tx = optim.make_optimizer(opt, total_steps, self.split(params)[0])
        self.scales = {}


# ---------------------------------------------------------------------------------------------
# Label sets, loss, step
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Loss(losses.SinglePositiveLoss):
    """`config.loss` of SigRL: `OV_LOSS` (open vocabulary: ranking + distillation) or 'em'
    (its SPML mode, with the single-positive fields of `losses.SinglePositiveLoss`)."""

    name: str = OV_LOSS  # 'sigrl' (open vocabulary) or 'em' (single positives)
    rank_weight: float = 1.0  # weight of the ranking loss over the seen labels
    distill_weight: float = 1.0  # weight of the L1 distillation to the frozen CLIP teacher


def is_open_vocabulary(config: ml_collections.ConfigDict) -> bool:
    """OV training (ranking + distillation over the seen labels) or a single-positive loss."""
    return config.loss.name == OV_LOSS


def init_extra(config: ml_collections.ConfigDict, training) -> dict:
    """OV: the seen and unseen class ids (`training.unseen`, from `config.data.unseen_classes`
    or the data set's own split); SPML: the observed labels (`mlgraph.models.spml`).

    Raises:
      ConfigError: OV training without unseen classes, or an SPML loss without observed labels.
    """
    if not is_open_vocabulary(config):
        from mlgraph.models import spml

        if config.loss.name != "em":
            raise ConfigError(
                f"config.loss.name={config.loss.name!r}: SigRL trains with '{OV_LOSS}' "
                "(open vocabulary) or 'em' (single positives, its SPML mode)"
            )
        return spml.init_extra(config, training)
    unseen = np.asarray(training.unseen, np.int32)
    if not unseen.size:
        raise ConfigError(
            "config.loss.name='sigrl' trains on the seen classes and tests on the unseen ones: "
            "set config.data.unseen_classes (class names), or use a data set that defines the "
            "split (nuswide 'ov')"
        )
    seen = np.setdiff1d(np.arange(training.num_classes), unseen).astype(np.int32)
    return {"seen_ids": jnp.asarray(seen), "unseen_ids": jnp.asarray(unseen)}


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """OV: ranking loss over the seen labels (±1; `label_mask` False = ignored) + L1
    distillation, both over the images with a seen positive; SPML: EM on the observed labels."""
    logits = outputs["logits"]
    if not is_open_vocabulary(config):
        loss = losses.spml_loss("em", logits, batch["observed"], cfg=config.loss)
        return loss, {"em": loss}
    # The queried (seen) classes, which the train step adds; without them, every class.
    seen = batch.get("seen_ids", slice(None))
    labels = batch["labels"][:, seen] > 0.5
    known = batch.get("label_mask")
    known = jnp.ones_like(labels) if known is None else known[:, seen].astype(bool)
    positive, negative = labels & known, ~labels & known
    kept = positive.any(axis=1).astype(jnp.float32)
    rank = losses.ranking(logits, positive, negative, kept)
    aux = {"rank": rank, "kept_images": kept.sum()}
    loss = config.loss.rank_weight * rank
    if "teacher" in outputs:
        distill = losses.l1_distillation(outputs["global"], outputs["teacher"], kept)
        loss = loss + config.loss.distill_weight * distill
        aux["distill"] = distill
    return loss, aux


def make_train_step(ctx):
    """Differentiates the trainable parameters only; OV queries the seen labels (and the
    teacher); a batch without any kept image leaves the state as it was (SigRL skips it)."""
    config = ctx.config
    lr_fn = optim.learning_rate_fn(config.optimizer, ctx.total_steps)
    ov = is_open_vocabulary(config)

    def train_step(state, batch):
        extra = state["extra"]
        trainable, frozen = ctx.tx.split(state["params"])
        if ov:
            batch = dict(batch, seen_ids=extra["seen_ids"])
            kwargs = dict(label_ids=extra["seen_ids"], teacher=config.model.distill)
        else:
            batch = dict(batch, observed=extra["observed"][batch["index"]])
            kwargs = {}
        key = jax.random.fold_in(jax.random.key(config.seed + 1), state["step"])

        def loss_of(trainable, rest):
            model = nnx.merge(ctx.graphdef, trainable, frozen, jax.tree.map(lambda x: x, rest))
            out = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=key), **kwargs)
            loss, aux = ctx.mod.loss_fn(out, batch, config)
            return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            trainable, state["rest"]
        )
        updates, opt = ctx.tx.update(grads, state["opt"], trainable)
        params = nnx.merge_state(optax.apply_updates(trainable, updates), frozen)
        new = ctx.finish(state, params, rest, opt)
        if ov:
            # SigRL drops images without a seen positive; an empty batch is no optimizer step
            # (its learning-rate schedule, set per iteration, still moves on).
            empty = aux["kept_images"] == 0
            keep_old = lambda a, b: jnp.where(empty, a, b)  # noqa: E731
            for name in ("params", "rest", "ema"):
                new[name] = jax.tree.map(keep_old, state[name], new[name])
            new["opt"] = optim.skipped_update(state["opt"], new["opt"], empty)
        return new, {"loss": loss, "lr": lr_fn(state["step"]), **aux}

    return train_step


# ---------------------------------------------------------------------------------------------
# Evaluation views: ZSL over the unseen labels, GZSL over all (docs/sigrl.md §5.1)
# ---------------------------------------------------------------------------------------------
def eval_views(config: ml_collections.ConfigDict, extra: dict) -> dict[str, np.ndarray | None]:
    """Named label sets that evaluation scores with a forward pass of their own (None = every
    class, the loop's own scores): OV 'zsl' (the unseen classes) and 'gzsl' (all)."""
    if not is_open_vocabulary(config) or "unseen_ids" not in extra:
        return {}
    return dict(zip(VIEWS, (np.asarray(extra["unseen_ids"]), None), strict=True))


def view_metrics(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """BiAM's zero-shot table of one view: mAP (a class without positives counts 0) and the
    overall P/R/F1 at K = 3 and 5."""
    return metrics.zero_shot_metrics(scores, labels > 0.5, mask, ks=metrics.ZERO_SHOT_KS)


VIEWS = ("zsl", "gzsl")  # the names `eval_views` gives


def view_metric_names() -> list[str]:
    """Every `<view>_<metric>` an evaluation logs (`eval_views`' names x `view_metrics`' keys)."""
    return [f"{v}_{n}" for v in VIEWS for n in metrics.zero_shot_metric_names(metrics.ZERO_SHOT_KS)]

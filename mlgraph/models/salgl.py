"""SALGL: scene-aware label graph learning (Zhu et al., ICCV 2023), docs/salgl.md §1-§2.

    backbone tokens [B, N, D] -> 1 post-norm transformer encoder layer (optional sine positions)
      -> mean over tokens -> scene_linear -> scene probabilities p [B, K]
      -> (training) comatrix[K, C, C] += the batch's scene-assigned label co-occurrences
      -> per-image adjacency A_b from the scene-conditional transition matrices
      -> low-rank bilinear attention of the label embeddings over the tokens -> h0 [B, C, D]
      -> gated GNN over A_b (num_steps) -> tanh(fc([h0 ; hT])) -> per-class linear -> logits

The attribute names are the official code's (`tb`, `scene_linear`, `ggnn`, `attention`, `fc`,
`classifier`, `embeddings`, `comatrix`), so `mlgraph.convert.salgl` maps an `ema_best_model.pth`
by renaming. The co-occurrence counts and file label embeddings are `Buffer`s: checkpointed and
EMA-averaged, never optimized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mlgraph import losses
from mlgraph.errors import ConfigError
from mlgraph.labels.embeddings import load_embeddings
from mlgraph.models import backbones
from mlgraph.models.attention import (
    LowRankBilinearAttention,
    TransformerEncoderLayer,
    sine_position_encoding,
)
from mlgraph.models.common import NO_KWARGS, Buffer  # noqa: F401 (Buffer re-exported)
from mlgraph.models.graph import (
    GatedGNN,
    comatrix_to_prob,
    cooccurrence_update,
    sample_adjacency,
)
from mlgraph.models.layers import ElementWiseLinear, torch_linear

EMBED_TYPES = ("file", "random", "checkpoint")


class SALGL(nnx.Module):
    """The SALGL network (see the module docstring); `config.model` holds its arguments.

    Attributes:
      backbone: token backbone ([B, H, W, 3] -> [B, N, D]).
      tb: the transformer encoder layer (`tb.layers.0` in torch).
      scene_linear: Linear(D, K), no bias.
      embeddings: label embeddings [C, E] (`Buffer`; a `Param` [C, D] when random).
      comatrix: scene co-occurrence counts [K, C, C] (`Buffer`), updated in training.
      attention: low-rank bilinear attention (D, E, att_dim).
      ggnn: gated GNN (D, num_steps, outmess).
      fc: Linear(2D or D, D), followed by tanh (`fc.0` in torch).
      classifier: per-class linear (C, D).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        backbone: str = "resnet101",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
        num_scenes: int = 6,
        num_steps: int = 3,
        outmess: bool = True,
        normalize: bool = True,
        ignore_self: bool = False,
        soft: bool = False,
        pos: bool = False,
        embed_type: str = "file",
        embed_path: str = "",
        embed_dim: int = 0,
        att_dim: int = 1024,
        ffn_dim: int = 2048,
        heads: int = 8,
        dropout: float = 0.1,
        comat_ema: bool = True,
        frozen_bn: bool = False,
    ):
        """The keyword arguments after `rngs` are SALGL's `config.model` fields (this
        constructor is their one definition, documented here field by field, hence its length).
        Defaults
        marked (†) follow the unofficial reproduction's COCO config (the official configs are
        not released); the rest are the official `get_args` defaults.

        Args:
          backbone, backbone_kwargs: a registered backbone and extra arguments for it.
          num_scenes: K (†; get_args default 4). num_steps: GGNN steps T.
          outmess: (†) the GGNN also propagates along A^T. normalize: (†) row-normalise the
            transition matrices. ignore_self: zero their diagonal. soft: probability-weighted
            scene assignment instead of the arg-max scene.
          pos: sine position codes in the encoder (ResNet backbones; image_size % 32 == 0).
          embed_type: 'file' (fixed embeddings from `embed_path`, a .npy [C, E]), 'random'
            (trainable N(0, 1) [C, D]) or 'checkpoint' (a zero [C, embed_dim] buffer filled
            from a weights checkpoint). embed_dim: E; 0 = from the file.
          att_dim: A of the bilinear attention. ffn_dim: encoder FFN width (2048 in the original
            even for D = 1024). heads: encoder heads. dropout: encoder dropout.
          comat_ema: the EMA model averages the co-occurrence counts like every other entry;
            False: it takes the live counts (`ema_live_paths`).
          frozen_bn: the backbone's batch norm always uses running statistics (a frozen,
            pretrained backbone); False: batch statistics in training (SyncBN, as the official).

        Raises:
          ConfigError: unknown embed_type, `pos` with a ViT backbone, an image size the
            position grid does not divide, or unusable embeddings.
        """
        if embed_type not in EMBED_TYPES:
            raise ConfigError(
                f"config.model.embed_type={embed_type!r}: expected one of {', '.join(EMBED_TYPES)}"
            )
        pos_grid = None
        if pos:
            if "vit" in backbone:
                raise ConfigError(
                    f"config.model.pos=True does not work with backbone {backbone!r}: the sine "
                    "table has no row for the class token (use pos=False, as SALGL's ViT runs)"
                )
            if image_size % 32:
                raise ConfigError(
                    f"config.image_size={image_size}: position codes need a multiple of 32"
                )
            pos_grid = image_size // 32
        embeddings = None
        if embed_type == "file":
            embeddings = load_embeddings(embed_path, num_classes, embed_dim)
        backbone = backbones.build(
            backbone, image_size=image_size, dtype=dtype, rngs=rngs, **backbone_kwargs
        )
        if embed_type == "random" and embed_dim not in (0, backbone.num_features):
            raise ConfigError(
                f"config.model.embed_dim={embed_dim}: random embeddings have the backbone's "
                f"width {backbone.num_features} (set 0)"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = int(backbone.num_features)
        c, k = int(num_classes), int(num_scenes)
        self.backbone = backbone
        self.frozen_bn = bool(frozen_bn)
        self.comat_ema = bool(comat_ema)
        self.dtype = dtype
        self.num_classes, self.num_scenes, self.num_steps = c, k, int(num_steps)
        self.normalize, self.ignore_self, self.soft = bool(normalize), bool(ignore_self), bool(soft)
        self.pos_grid = pos_grid
        self.dropout_rate = float(dropout)
        self.tb = TransformerEncoderLayer(d, heads, ffn_dim, dropout, **kw)
        if embed_type == "random":
            self.embeddings = nnx.Param(jax.random.normal(rngs.params(), (c, d), param_dtype))
        elif embed_type == "file":
            self.embeddings = Buffer(jnp.asarray(embeddings, jnp.float32))
        elif embed_type == "checkpoint":
            if embed_dim <= 0:
                raise ConfigError(
                    "config.model.embed_dim: embed_type='checkpoint' needs the embedding width"
                )
            self.embeddings = Buffer(jnp.zeros((c, embed_dim), jnp.float32))
        e = int(self.embeddings.shape[1])
        self.scene_linear = torch_linear(d, k, use_bias=False, **kw)
        self.ggnn = GatedGNN(d, num_steps, outmess, **kw)
        self.comatrix = Buffer(jnp.zeros((k, c, c), jnp.float32))
        self.attention = LowRankBilinearAttention(d, e, att_dim, **kw)
        self.fc = torch_linear(2 * d if self.num_steps > 0 else d, d, **kw)
        self.classifier = ElementWiseLinear(c, d, **kw)

    def __call__(
        self,
        images: jax.Array,
        *,
        labels: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> outputs.

        In training (`train=True` with `labels` [B, C]) the co-occurrence counts are first
        updated with the batch (the global batch under a data-parallel jit), then the adjacency
        is built from them, as in the original. Evaluation never changes them.

        Returns:
          {'logits' [B, C], 'scene_probs' [B, K], 'sample_en' [], 'batch_en' [],
           'att_weights' [B, C, N], 'adjacency' [B, C, C]}, all float32.
        """
        if train and self.dropout_rate > 0 and rngs is None:
            raise ValueError("SALGL: train=True needs rngs (with a 'dropout' stream)")
        # Named scopes label the parts in `mlgraph.bench --profile`'s cost table.
        with jax.named_scope("backbone"):
            x = self.backbone(images, train=train and not self.frozen_bn).astype(self.dtype)
        pos = None
        if self.pos_grid is not None:
            if x.shape[1] != self.pos_grid**2:
                raise ValueError(
                    f"SALGL: position codes were built for a {self.pos_grid}x{self.pos_grid} "
                    f"token grid, but the backbone returned {x.shape[1]} tokens"
                )
            pos = jnp.asarray(sine_position_encoding(x.shape[-1], self.pos_grid))[None]
        with jax.named_scope("encoder"):
            x = self.tb(x, pos, train=train, rngs=rngs)

        with jax.named_scope("scene_graph"):
            scene_scores = self.scene_linear(x.mean(axis=1)).astype(jnp.float32)
            scene_probs = jax.nn.softmax(scene_scores, axis=-1)
            comatrix = self.comatrix[...]
            if train and labels is not None:
                comatrix = jax.lax.stop_gradient(comatrix) + cooccurrence_update(
                    scene_probs, labels, self.soft
                )
                self.comatrix.set_value(comatrix)
            probs_matrix = comatrix_to_prob(comatrix, self.normalize, self.ignore_self)
            adjacency = sample_adjacency(probs_matrix, scene_probs, self.soft)

        with jax.named_scope("attention"):
            embeddings = self.embeddings[...].astype(self.dtype)
            label_feats, alphas = self.attention(x, embeddings)
        if self.num_steps > 0:
            with jax.named_scope("ggnn"):
                h = self.ggnn(label_feats, adjacency)
            label_feats = jnp.concatenate([label_feats, h], axis=-1)
        with jax.named_scope("classifier"):
            logits = self.classifier(jnp.tanh(self.fc(label_feats)))
        return {
            "logits": logits.astype(jnp.float32),
            "scene_probs": scene_probs,
            "sample_en": losses.sample_entropy(scene_probs),
            "batch_en": losses.batch_entropy(scene_probs),
            "att_weights": alphas,
            "adjacency": adjacency,
        }


def ema_live_paths(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """With `comat_ema` off the EMA model uses the live co-occurrence counts
    (docs/salgl.md §3.1)."""
    return () if config.model.get("comat_ema", True) else (r"rest/comatrix(/.*)?",)


@dataclasses.dataclass(frozen=True)
class Loss(losses.ClassificationLoss):
    """`config.loss` of SALGL: the classification loss (ASL in the paper's recipe) and the
    weight of the scene entropy terms."""

    name: str = "asl"  # 'asl' (the paper's) or 'bce'
    lamda: float = 1.0  # weight of the scene entropy terms (sample_en + batch_en); spelt as SALGL


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """cls + lamda * (sample_en + batch_en), cls the ASL or BCE of the logits (`config.loss`).

    Returns:
      (total, {'<loss name>': cls, 'sample_en': ..., 'batch_en': ...}).
    """
    cls = losses.classification(outputs["logits"], batch["labels"], config.loss)
    total = cls + config.loss.lamda * (outputs["sample_en"] + outputs["batch_en"])
    return total, {
        config.loss.name: cls,
        "sample_en": outputs["sample_en"],
        "batch_en": outputs["batch_en"],
    }


Model = SALGL

"""SALGL: scene-aware label graph learning (Zhu et al., ICCV 2023), salgl.md §1-§2.

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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mlgraph import config_lib, losses
from mlgraph.errors import ConfigError
from mlgraph.models import backbones
from mlgraph.models.attention import (
    LowRankBilinearAttention,
    TransformerEncoderLayer,
    sine_position_encoding,
)
from mlgraph.models.common import (  # noqa: F401 (Buffer, load_embeddings re-exported)
    Buffer,
    create_from_config,
    load_embeddings,
)
from mlgraph.models.graph import (
    GatedGNN,
    comatrix_to_prob,
    cooccurrence_update,
    sample_adjacency,
)
from mlgraph.models.layers import ElementWiseLinear, torch_linear

EMBED_TYPES = ("file", "random", "checkpoint")
LOSSES = ("asl", "bce")

# The default `config.model` fields. Those marked (†) follow the unofficial reproduction's
# COCO config (the official configs are not released); the rest are `get_args` defaults.
DEFAULTS: dict[str, Any] = {
    "name": "salgl",
    "backbone": "resnet101",
    # Extra keyword arguments for the backbone's `create` (e.g. a reduced ResNet in tests).
    "backbone_kwargs": {},
    "num_scenes": 6,  # (†) K; get_args default 4
    "num_steps": 3,  # GGNN steps T
    "outmess": True,  # (†) GGNN also propagates along A^T
    "normalize": True,  # (†) row-normalise the transition matrices
    "ignore_self": False,
    "soft": False,  # soft (probability-weighted) scene assignment
    "pos": False,  # sine position codes in the encoder (ResNet backbones only)
    # 'file': fixed embeddings from `embed_path` (.npy [C, E]); 'random': trainable N(0, 1)
    # [C, D]; 'checkpoint': a zero [C, embed_dim] buffer filled from a weights checkpoint.
    "embed_type": "file",
    "embed_path": "",
    "embed_dim": 0,  # E; 0 = from the file. Required for 'checkpoint'.
    "att_dim": 1024,  # A of the bilinear attention
    "ffn_dim": 2048,  # encoder FFN width (fixed at 2048 in the original, even for D = 1024)
    "heads": 8,
    "dropout": 0.1,  # encoder dropout (attention probabilities and residual branches)
    "loss": "asl",  # 'asl' or 'bce'
    "gamma_pos": 0.0,
    "gamma_neg": 2.0,
    "clip": 0.0,
    "lamda": 1.0,  # weight of (sample_en + batch_en)
    # True: the EMA model averages the counts like every other entry. False: the EMA model
    # uses the live counts (the training loop copies `comatrix` instead of averaging it).
    "comat_ema": True,
    # True: the backbone's batch norm always uses its running statistics (a frozen, pretrained
    # backbone); False: batch statistics in training, as the official code (SyncBN).
    "frozen_bn": False,
}


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` fields of SALGL (`DEFAULTS`), with `overrides` applied.

    Raises:
      ConfigError: for a field SALGL does not have.
    """
    return config_lib.model_fields("SALGL", DEFAULTS, overrides)


def _field(cfg: Mapping[str, Any] | ml_collections.ConfigDict, name: str) -> Any:
    return config_lib.model_field(cfg, name, DEFAULTS)


class SALGL(nnx.Module):
    """The SALGL network (see the module docstring); build it with `create` or `build`.

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
        backbone: nnx.Module,
        *,
        num_classes: int,
        num_scenes: int,
        num_steps: int = 3,
        outmess: bool = True,
        normalize: bool = True,
        ignore_self: bool = False,
        soft: bool = False,
        pos_grid: int | None = None,
        embed_type: str = "file",
        embeddings: np.ndarray | None = None,
        embed_dim: int = 0,
        att_dim: int = 1024,
        ffn_dim: int = 2048,
        heads: int = 8,
        dropout: float = 0.1,
        frozen_bn: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Args are the `config.model` fields; `pos_grid` is the token grid side when
        position codes are used (None: no position codes), `embeddings` the file table for
        embed_type='file'."""
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = int(backbone.num_features)
        c, k = int(num_classes), int(num_scenes)
        self.backbone = backbone
        self.frozen_bn = bool(frozen_bn)
        self.dtype = dtype
        self.num_classes, self.num_scenes, self.num_steps = c, k, int(num_steps)
        self.normalize, self.ignore_self, self.soft = bool(normalize), bool(ignore_self), bool(soft)
        self.pos_grid = pos_grid
        self.dropout_rate = float(dropout)
        self.tb = TransformerEncoderLayer(d, heads, ffn_dim, dropout, **kw)
        if embed_type == "random":
            self.embeddings = nnx.Param(jax.random.normal(rngs.params(), (c, d), param_dtype))
        elif embed_type == "file":
            if embeddings is None or embeddings.shape[0] != c:
                raise ValueError(f"SALGL: embed_type='file' needs embeddings of shape [{c}, E]")
            self.embeddings = Buffer(jnp.asarray(embeddings, jnp.float32))
        elif embed_type == "checkpoint":
            if embed_dim <= 0:
                raise ConfigError(
                    "config.model.embed_dim: embed_type='checkpoint' needs the embedding width"
                )
            self.embeddings = Buffer(jnp.zeros((c, embed_dim), jnp.float32))
        else:
            raise ConfigError(
                f"config.model.embed_type={embed_type!r}: expected one of {', '.join(EMBED_TYPES)}"
            )
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
        x = self.backbone(images, train=train and not self.frozen_bn).astype(self.dtype)
        pos = None
        if self.pos_grid is not None:
            if x.shape[1] != self.pos_grid**2:
                raise ValueError(
                    f"SALGL: position codes were built for a {self.pos_grid}x{self.pos_grid} "
                    f"token grid, but the backbone returned {x.shape[1]} tokens"
                )
            pos = jnp.asarray(sine_position_encoding(x.shape[-1], self.pos_grid))[None]
        x = self.tb(x, pos, train=train, rngs=rngs)

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

        embeddings = self.embeddings[...].astype(self.dtype)
        label_feats, alphas = self.attention(x, embeddings)
        if self.num_steps > 0:
            h = self.ggnn(label_feats, adjacency)
            label_feats = jnp.concatenate([label_feats, h], axis=-1)
        logits = self.classifier(jnp.tanh(self.fc(label_feats)))
        return {
            "logits": logits.astype(jnp.float32),
            "scene_probs": scene_probs,
            "sample_en": losses.sample_entropy(scene_probs),
            "batch_en": losses.batch_entropy(scene_probs),
            "att_weights": alphas,
            "adjacency": adjacency,
        }


def build(
    model_cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    num_classes: int,
    image_size: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    embeddings: np.ndarray | None = None,
) -> SALGL:
    """Build SALGL from `config.model`-style fields (missing ones take `DEFAULTS`).

    `embeddings` replaces reading `embed_path` for embed_type='file' (already loaded table).

    Raises:
      ConfigError: unknown embed_type or loss, `pos` with a ViT backbone, an image size the
        position grid does not divide, or unusable embeddings.
    """
    backbone_name = _field(model_cfg, "backbone")
    embed_type = _field(model_cfg, "embed_type")
    loss = _field(model_cfg, "loss")
    if embed_type not in EMBED_TYPES:
        raise ConfigError(
            f"config.model.embed_type={embed_type!r}: expected one of {', '.join(EMBED_TYPES)}"
        )
    if loss not in LOSSES:
        raise ConfigError(f"config.model.loss={loss!r}: expected one of {', '.join(LOSSES)}")
    pos_grid = None
    if _field(model_cfg, "pos"):
        if "vit" in backbone_name:
            raise ConfigError(
                f"config.model.pos=True does not work with backbone {backbone_name!r}: the "
                "sine table has no row for the class token (use pos=False, as SALGL's ViT runs)"
            )
        if image_size % 32:
            raise ConfigError(
                f"config.image_size={image_size}: position codes need a multiple of 32"
            )
        pos_grid = image_size // 32
    embed_dim = int(_field(model_cfg, "embed_dim"))
    if embed_type == "file" and embeddings is None:
        embeddings = load_embeddings(_field(model_cfg, "embed_path"), num_classes, embed_dim)
    backbone = backbones.build(
        backbone_name,
        image_size=image_size,
        dtype=dtype,
        rngs=rngs,
        **_field(model_cfg, "backbone_kwargs"),
    )
    if embed_type == "random" and embed_dim not in (0, backbone.num_features):
        raise ConfigError(
            f"config.model.embed_dim={embed_dim}: random embeddings have the backbone's width "
            f"{backbone.num_features} (set 0)"
        )
    return SALGL(
        backbone,
        num_classes=num_classes,
        num_scenes=int(_field(model_cfg, "num_scenes")),
        num_steps=int(_field(model_cfg, "num_steps")),
        outmess=bool(_field(model_cfg, "outmess")),
        normalize=bool(_field(model_cfg, "normalize")),
        ignore_self=bool(_field(model_cfg, "ignore_self")),
        soft=bool(_field(model_cfg, "soft")),
        pos_grid=pos_grid,
        embed_type=embed_type,
        embeddings=embeddings,
        embed_dim=embed_dim,
        att_dim=int(_field(model_cfg, "att_dim")),
        ffn_dim=int(_field(model_cfg, "ffn_dim")),
        heads=int(_field(model_cfg, "heads")),
        dropout=float(_field(model_cfg, "dropout")),
        frozen_bn=bool(_field(model_cfg, "frozen_bn")),
        dtype=dtype,
        rngs=rngs,
    )


def create(config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs) -> SALGL:
    """Build the SALGL that `config.model` describes, for `config.image_size` images.

    Label embeddings come from `config.model.embed_path` (embed_type='file'), are drawn at
    random ('random'), or are zeros to be filled from a checkpoint ('checkpoint').
    """
    return create_from_config(build, config, num_classes=num_classes, rngs=rngs)


def ema_live_paths(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """With `comat_ema` off the EMA model uses the live co-occurrence counts (spec §3.1)."""
    return () if _field(config.model, "comat_ema") else (r"rest/comatrix(/.*)?",)


def loss_fn(outputs: dict, labels: jax.Array, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """cls + lamda * (sample_en + batch_en), cls the ASL or BCE of the logits.

    Returns:
      (total, {'<loss name>': cls, 'sample_en': ..., 'batch_en': ...}).
    """
    m = config.model
    if m.loss == "asl":
        cls = losses.asl(
            outputs["logits"], labels, gamma_pos=m.gamma_pos, gamma_neg=m.gamma_neg, clip=m.clip
        )
    elif m.loss == "bce":
        cls = losses.bce(outputs["logits"], labels)
    else:
        raise ConfigError(f"config.model.loss={m.loss!r}: expected one of {', '.join(LOSSES)}")
    total = cls + m.lamda * (outputs["sample_en"] + outputs["batch_en"])
    return total, {m.loss: cls, "sample_en": outputs["sample_en"], "batch_en": outputs["batch_en"]}

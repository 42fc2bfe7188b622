"""Query2Label: a transformer decoder with label queries (Liu et al., arXiv 2107.10834).

ssgrl_mlgcn.md §4, as the official code computes it:

    backbone layer4 map [B, h, w, C] -> (input_proj, a 1x1 conv, only with keep_input_proj)
      -> memory [B, N, D] with DETR's normalised sine position codes `pos` [N, D]
      -> encoder: `enc_layers` post-norm layers (q = k = memory + pos), no final norm
      -> decoder: targets start at zeros; each layer (self-attention removed by default) lets
         t + query_embed attend over memory + pos (values: memory), then the FFN;
         a final LayerNorm
      -> per-label linear classifiers on the K decoder outputs -> logits [B, K];  loss: ASL.

The backbone's batch norm is frozen (`frozen_bn`, the official FrozenBatchNorm2d); the position
codes are computed for the feature map's actual size, so one model runs at any resolution.
Attribute names are the official ones where the structure allows; `mlgraph.convert.q2l` maps
the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mlgraph import config_lib, losses
from mlgraph.errors import ConfigError
from mlgraph.models.attention import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    sine_position_encoding,
)
from mlgraph.models.common import cnn_backbone, create_from_config
from mlgraph.models.layers import ElementWiseLinear, torch_linear, xavier_uniform

DEFAULTS: dict[str, Any] = {
    "name": "q2l",
    "backbone": "resnet101",
    "backbone_kwargs": {},
    "hidden_dim": 2048,  # d_model; equals ResNet's 2048 channels, so no input projection
    "num_heads": 4,
    "ffn_dim": 8192,
    "enc_layers": 1,
    "dec_layers": 2,
    "dropout": 0.1,
    # The official switches (their argparse names): a 1x1 conv from the backbone channels to
    # hidden_dim (needed when they differ), and decoder self-attention (removed by default).
    "keep_input_proj": False,
    "keep_first_self_attn_dec": False,
    "keep_other_self_attn_dec": False,
    # True: the backbone's batch norm always uses running statistics (FrozenBatchNorm2d).
    "frozen_bn": True,
    # ASL (`AsymmetricLossOptimized`, focal weights without gradient).
    "gamma_pos": 0.0,
    "gamma_neg": 2.0,
    "clip": 0.0,
    "eps": 1e-5,
}

# Backbone parameters the official recipe never trains: the stem and layer1 (its
# `requires_grad_(False)` on names without layer2/3/4), and every batch-norm affine (they are
# buffers in FrozenBatchNorm2d).
FROZEN_BACKBONE = (
    "backbone/(conv1|bn1|layer1)/.*",
    "backbone/.*/(bn[0-9]+|downsample_bn)/.*",
)


# `config.model` fields that are not arguments of `Query2Label`.
_NOT_ARCHITECTURE = ("name", "backbone", "backbone_kwargs", "gamma_pos", "gamma_neg", "clip", "eps")


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` fields of Query2Label (`DEFAULTS`), with `overrides` applied.

    Raises:
      ConfigError: for a field Query2Label does not have.
    """
    return config_lib.model_fields("Query2Label", DEFAULTS, overrides)


def official_config(
    *,
    data: str,
    image_size: int,
    builder_config: str = "",
    eval_split: str = "val",
    train_split: str = "train",
) -> ml_collections.ConfigDict:
    """The official R101 recipe (ssgrl_mlgcn.md §4.1) on `data`, for the configs/ files.

    AdamW (wd 1e-2) under one-cycle to 1e-4 (pct 0.2, beta1 cycled 0.85-0.95), batch 128,
    80 epochs, EMA 0.9997 (the best of model and EMA is kept), resize + Cutout 0.5 +
    RandAugment (no flip), ASL gamma- 2; conv1 and layer1 and every batch norm frozen.
    """
    c = config_lib.base_config()
    c.data.name = data
    c.data.builder_config = builder_config
    c.data.train_split = train_split
    c.data.eval_split = eval_split
    c.data.worker_count = 8
    c.data.augment.flip = False
    c.data.augment.cutout = 0.5
    c.data.augment.randaugment = True
    c.image_size = image_size
    c.batch_size = 128
    c.eval_batch_size = 128
    c.num_epochs = 80.0
    c.eval_every_steps = 1000
    c.log_every_steps = 50
    c.dtype = "bfloat16"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 1e-2
    c.optimizer.frozen = FROZEN_BACKBONE
    c.ema.decay = 0.9997
    c.model = model_config(backbone="resnet101")
    return c


def _field(cfg: Mapping[str, Any] | ml_collections.ConfigDict, name: str) -> Any:
    return config_lib.model_field(cfg, name, DEFAULTS)


class Query2Label(nnx.Module):
    """The Query2Label network (module docstring); build it with `create` or `build`.

    Attributes:
      backbone: CNN backbone with `feature_map` (`backbone.0.body` in torch).
      input_proj: Linear C -> D on the tokens (the 1x1 conv), or None (torch's Identity).
      encoder, decoder: lists of post-norm layers (`transformer.{encoder,decoder}.layers`).
      decoder_norm: the final decoder LayerNorm (`transformer.decoder.norm`).
      query_embed: the label queries [K, D] (`query_embed.weight`).
      fc: one linear classifier per label (`fc.W`, `fc.b`).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        *,
        num_classes: int,
        hidden_dim: int = 2048,
        num_heads: int = 4,
        ffn_dim: int = 8192,
        enc_layers: int = 1,
        dec_layers: int = 2,
        dropout: float = 0.1,
        keep_input_proj: bool = False,
        keep_first_self_attn_dec: bool = False,
        keep_other_self_attn_dec: bool = False,
        frozen_bn: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Args are the architecture fields of `config.model` (see `DEFAULTS`)."""
        channels = int(backbone.num_features)
        d = int(hidden_dim)
        if not keep_input_proj and channels != d:
            raise ConfigError(
                f"config.model.hidden_dim={d} differs from the backbone's {channels} channels: "
                "set config.model.keep_input_proj=True (a 1x1 projection) or "
                f"hidden_dim={channels}"
            )
        if dec_layers < 1:
            raise ConfigError(f"config.model.dec_layers={dec_layers}: need at least 1")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The official `_reset_parameters` draws every transformer matrix xavier-uniform (the
        # fused q/k/v projection already is); biases keep torch's defaults.
        layer_kw = dict(
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            kernel_init=xavier_uniform(),
            **kw,
        )
        self.backbone = backbone
        self.frozen_bn = bool(frozen_bn)
        self.dtype = dtype
        self.hidden_dim = d
        self.input_proj = torch_linear(channels, d, **kw) if keep_input_proj else None
        self.encoder = nnx.List(
            [TransformerEncoderLayer(d, **layer_kw) for _ in range(int(enc_layers))]
        )
        self.decoder = nnx.List(
            [
                TransformerDecoderLayer(
                    d,
                    self_attn=keep_first_self_attn_dec if i == 0 else keep_other_self_attn_dec,
                    **layer_kw,
                )
                for i in range(int(dec_layers))
            ]
        )
        self.decoder_norm = nnx.LayerNorm(d, epsilon=1e-5, use_fast_variance=False, **kw)
        # nn.Embedding's N(0, 1).
        self.query_embed = nnx.Param(
            jax.random.normal(rngs.params(), (int(num_classes), d), param_dtype)
        )
        self.fc = ElementWiseLinear(int(num_classes), d, **kw)

    def __call__(
        self,
        images: jax.Array,
        *,
        labels: jax.Array | None = None,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> {'logits' [B, K] float32, 'label_feats' [B, K, D]}."""
        del labels
        fmap = self.backbone.feature_map(images, train=train and not self.frozen_bn)
        b, h, w, c = fmap.shape
        x = fmap.reshape(b, h * w, c).astype(self.dtype)
        if self.input_proj is not None:
            x = self.input_proj(x)
        # A numpy constant for the static map size: no buffer ties the model to one resolution.
        pos = jnp.asarray(sine_position_encoding(self.hidden_dim, (h, w)), self.dtype)[None]
        for layer in self.encoder:
            x = layer(x, pos, train=train, rngs=rngs)
        queries = self.query_embed[...].astype(self.dtype)[None]
        t = jnp.zeros((b, *queries.shape[1:]), self.dtype)
        for layer in self.decoder:
            t = layer(t, x, pos=pos, query_pos=queries, train=train, rngs=rngs)
        t = self.decoder_norm(t)
        return {"logits": self.fc(t).astype(jnp.float32), "label_feats": t}


def build(
    model_cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    num_classes: int,
    image_size: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> Query2Label:
    """Build Query2Label from `config.model`-style fields (missing ones take `DEFAULTS`).

    Raises:
      ConfigError: a backbone without a feature map, or hidden_dim != the backbone's channels
        without keep_input_proj.
    """
    backbone = cnn_backbone(
        _field(model_cfg, "backbone"),
        _field(model_cfg, "backbone_kwargs"),
        "Query2Label",
        image_size=image_size,
        dtype=dtype,
        rngs=rngs,
    )
    fields = {k: _field(model_cfg, k) for k in DEFAULTS if k not in _NOT_ARCHITECTURE}
    return Query2Label(backbone, num_classes=int(num_classes), dtype=dtype, rngs=rngs, **fields)


def create(config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs) -> Query2Label:
    """Build the Query2Label that `config.model` describes, for `config.image_size` images."""
    return create_from_config(build, config, num_classes=num_classes, rngs=rngs)


def loss_fn(outputs: dict, labels: jax.Array, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ASL with the config's gammas, clip and eps (ssgrl_mlgcn.md §4.1)."""
    m = config.model
    get = lambda k: float(m.get(k, DEFAULTS[k]))  # noqa: E731
    loss = losses.asl(
        outputs["logits"],
        labels,
        gamma_pos=get("gamma_pos"),
        gamma_neg=get("gamma_neg"),
        clip=get("clip"),
        eps=get("eps"),
    )
    return loss, {"asl": loss}

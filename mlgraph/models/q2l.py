"""Query2Label: a transformer decoder with label queries (Liu et al., arXiv 2107.10834).

docs/ssgrl_mlgcn.md §4, as the official code computes it:

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

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph import losses
from mlgraph.errors import ConfigError
from mlgraph.models.attention import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    sine_position_encoding,
)
from mlgraph.models.common import NO_KWARGS, cnn_backbone
from mlgraph.models.layers import ElementWiseLinear, torch_linear, xavier_uniform


class Query2Label(nnx.Module):
    """The Query2Label network (module docstring); `config.model` holds its arguments.

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
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        backbone: str = "resnet101",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
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
    ):
        """The keyword arguments after `rngs` are Query2Label's `config.model` fields (this
        constructor is their one definition, documented here field by field, hence its length).

        Args:
          backbone, backbone_kwargs: a registered CNN backbone and extra arguments for it.
          hidden_dim: d_model; equals ResNet's 2048 channels, so no input projection.
          num_heads, ffn_dim, enc_layers, dec_layers, dropout: the transformer's.
          keep_input_proj, keep_first_self_attn_dec, keep_other_self_attn_dec: the official
            switches (their argparse names): a 1x1 conv from the backbone channels to
            hidden_dim (needed when they differ), and decoder self-attention (removed by
            default).
          frozen_bn: the backbone's batch norm always uses running statistics
            (FrozenBatchNorm2d).

        Raises:
          ConfigError: a backbone without a feature map, hidden_dim != the backbone's channels
            without keep_input_proj, or no decoder layer.
        """
        backbone = cnn_backbone(
            backbone,
            backbone_kwargs,
            "Query2Label",
            image_size=image_size,
            dtype=dtype,
            rngs=rngs,
        )
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
        sow_weights: bool = False,
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> {'logits' [B, K] float32, 'label_feats' [B, K, D]}.

        `sow_weights`: each decoder layer keeps its label queries' cross-attention over the
        h*w feature-map positions, [B, heads, K, h*w] (softmax over the positions), as the
        `nnx.Intermediate` `decoder/<i>/multihead_attn/attention_weights`
        (`mlgraph.viz.attention` reads them).
        """
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
            t = layer(
                t, x, pos=pos, query_pos=queries, train=train, rngs=rngs, sow_weights=sow_weights
            )
        t = self.decoder_norm(t)
        return {"logits": self.fc(t).astype(jnp.float32), "label_feats": t}


@dataclasses.dataclass(frozen=True)
class Loss(losses.ClassificationLoss):
    """`config.loss` of Query2Label: `losses.classification`, ASL by default (the official
    loss, docs/ssgrl_mlgcn.md §4.1)."""

    name: str = "asl"  # 'asl' (the official) or 'bce'


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`config.loss` (the official: ASL with its gammas, clip and eps, docs/ssgrl_mlgcn.md §4.1)."""
    loss = losses.classification(outputs["logits"], batch["labels"], config.loss)
    return loss, {config.loss.name: loss}


Model = Query2Label

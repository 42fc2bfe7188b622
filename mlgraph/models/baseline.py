"""The plain multi-label classifier: backbone tokens, global average pooling, linear head, BCE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph import losses
from mlgraph.models import backbones
from mlgraph.models.common import NO_KWARGS


class Baseline(nnx.Module):
    """Backbone -> mean over tokens -> Linear(num_features, C)."""

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        backbone: str = "simple_cnn",
        backbone_kwargs: Mapping[str, Any] = NO_KWARGS,
        frozen_bn: bool = False,
    ):
        """`backbone` and `backbone_kwargs` (e.g. SimpleCNN's `widths`) are the baseline's
        `config.model` fields; `frozen_bn`: the backbone's batch norm always uses its running
        statistics (a frozen, pretrained backbone)."""
        self.backbone = backbones.build(
            backbone, image_size=image_size, dtype=dtype, rngs=rngs, **backbone_kwargs
        )
        self.head = nnx.Linear(self.backbone.num_features, num_classes, dtype=dtype, rngs=rngs)
        self.frozen_bn = bool(frozen_bn)

    def __call__(
        self, images: jax.Array, *, labels=None, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> dict[str, jax.Array]:
        """Images [B, H, W, 3] -> {'logits' [B, C]} (float32)."""
        del labels, rngs  # the baseline has no label-dependent state and no dropout
        tokens = self.backbone(images, train=train and not self.frozen_bn)
        return {"logits": self.head(tokens.mean(axis=1)).astype(jnp.float32)}


# `config.loss`: BCE by default, or ASL (`losses.classification`).
Loss = losses.ClassificationLoss


def loss_fn(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`config.loss` (BCE over every (image, class) entry by default)."""
    loss = losses.classification(outputs["logits"], batch["labels"], config.loss)
    return loss, {config.loss.name: loss}


Model = Baseline

"""The plain multi-label classifier: backbone tokens, global average pooling, linear head, BCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mlgraph import losses
from mlgraph.models import backbones


class Baseline(nnx.Module):
    """Backbone -> mean over tokens -> Linear(num_features, C)."""

    def __init__(self, backbone: nnx.Module, num_classes: int, *, dtype, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(backbone.num_features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(
        self, images: jax.Array, *, labels=None, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> dict[str, jax.Array]:
        del labels, rngs  # the baseline has no label-dependent state and no dropout
        tokens = self.backbone(images, train=train)
        return {"logits": self.head(tokens.mean(axis=1)).astype(jnp.float32)}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Default `config.model` fields of the baseline."""
    c = ml_collections.ConfigDict({"name": "baseline", "backbone": "simple_cnn"})
    c.backbone_kwargs = ml_collections.ConfigDict({"widths": (32, 64, 128, 256)})
    c.update(overrides)
    if c.backbone != "simple_cnn":
        c.backbone_kwargs = ml_collections.ConfigDict()
    return c


def create(config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs) -> Baseline:
    """Build the baseline that `config.model` describes."""
    dtype = jnp.dtype(config.dtype)
    backbone = backbones.build(
        config.model.backbone,
        image_size=config.image_size,
        dtype=dtype,
        rngs=rngs,
        **config.model.backbone_kwargs.to_dict(),
    )
    return Baseline(backbone, num_classes, dtype=dtype, rngs=rngs)


def loss_fn(outputs: dict, labels: jax.Array, config) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BCE over every (image, class) entry."""
    del config
    loss = losses.bce(outputs["logits"], labels)
    return loss, {"bce": loss}

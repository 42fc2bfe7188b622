"""Small pieces shared by the models: the buffer variable type and the CNN backbone of a
`config.model`. (The fixed label inputs the graph methods read, word vectors and label graphs,
are loaded by `mlgraph.labels`.)"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from flax import nnx

from mlgraph.errors import ConfigError
from mlgraph.models import backbones

# The default of a `backbone_kwargs` field: an empty mapping that no call can mutate.
NO_KWARGS: Mapping[str, Any] = types.MappingProxyType({})


class Buffer(nnx.Variable):
    """Non-trainable model state that is part of the checkpoint and of the EMA.

    Examples: SALGL's scene co-occurrence counts (updated in the training step) and fixed label
    embeddings loaded from a file. Gradients are taken with respect to `nnx.Param` only, so a
    Buffer is never touched by the optimizer.
    """


def cnn_backbone(
    name: str,
    backbone_kwargs: Mapping[str, Any],
    method: str,
    *,
    image_size: int,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The registered backbone `name`, which must be a CNN (have a `feature_map`).

    Raises:
      ConfigError: a backbone without a feature map (e.g. a ViT).
    """
    backbone = backbones.build(
        name, image_size=image_size, dtype=dtype, rngs=rngs, **backbone_kwargs
    )
    if not hasattr(backbone, "feature_map"):
        raise ConfigError(
            f"config.model.backbone={name!r}: {method} needs a CNN backbone "
            "(one with a feature map)"
        )
    return backbone

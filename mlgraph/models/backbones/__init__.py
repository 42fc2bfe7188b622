"""Backbone registry: a name -> (module under `mlgraph.models.backbones`, its keyword arguments).

Every backbone module defines `create(*, image_size, dtype, rngs, **kwargs) -> nnx.Module`, and
every backbone it returns has

* `num_features: int`, the token width D;
* `__call__(x, *, train=False)`: images [B, H, W, 3] -> tokens [B, N, D]. CNNs return their last
  feature map flattened row-major (h outer, w inner), the order of torch's
  `x.flatten(2).transpose(1, 2)`; ViTs return every token (CLS first) after the final norm.

CNNs also have `feature_map(x, *, train=False) -> [B, h, w, D]`; `pyramid(x, *, train=False)`
-> (stride-16 map, stride-32 map), whose channels are `pyramid_features` (Scob's two scales);
and, when built with `num_classes=int`, `logits(x, *, train=False)` (global average pool +
torchvision's classifier).

Modules are imported only when a backbone is built, so that e.g. building a ResNet does not
import the ViT code.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
from flax import nnx

BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet50": ("resnet", {"depth": 50}),
    "resnet101": ("resnet", {"depth": 101}),
    "resnet152": ("resnet", {"depth": 152}),
    "mobilenet_v2": ("mobilenet_v2", {}),
    "simple_cnn": ("simple_cnn", {}),
    "vit_b16": ("vit", {"variant": "B/16"}),
    "vit_l16": ("vit", {"variant": "L/16"}),
    # OpenAI CLIP image towers (SigRL); their `proj` maps tokens into the text space.
    "clip_vit_b16": ("clip", {"variant": "ViT-B/16"}),
}


def build(
    name: str,
    *,
    image_size: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    **overrides: Any,
) -> nnx.Module:
    """Build the backbone registered as `name`.

    Args:
      name: a key of `BACKBONES`.
      image_size: side of the (square) input images.
      dtype: compute dtype.
      rngs: initialisation keys.
      **overrides: extra or replacing keyword arguments for the module's `create`
        (e.g. `num_classes=1000`, `param_dtype=...`, or `layers=(1, 1, 2, 1)` for a ResNet).

    Raises:
      ValueError: for a name that is not registered; the message lists the valid names.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    module_name, kwargs = BACKBONES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return module.create(image_size=image_size, dtype=dtype, rngs=rngs, **(kwargs | overrides))

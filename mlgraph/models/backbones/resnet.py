"""torchvision ResNet v1.5 (Bottleneck blocks, stride on the 3x3 conv) in Flax NNX.

The attribute names follow torchvision's (`conv1`, `bn1`, `layer1..layer4`, `fc`), so the
converter's table is a plain renaming: `layer3.5.conv2.weight` -> `layer3/5/conv2/kernel`. The
only torchvision name that changes is the shortcut: `downsample.0` / `downsample.1` become
`downsample_conv` / `downsample_bn`.

Padding is written out as in PyTorch (`((p, p), (p, p))`), never 'SAME', because 'SAME' pads
asymmetrically for strided convs and would not match torch weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph.models import layers

# Blocks per stage of the torchvision bottleneck ResNets.
LAYOUTS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
EXPANSION = 4

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, k, stride, pad, *, dtype, param_dtype, rngs) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        conv_general_dilated=layers.conv_general_dilated,  # XLA:CPU's slow weight gradient
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _bn(features, *, dtype, param_dtype, rngs) -> nnx.BatchNorm:
    # torch momentum 0.1 (weight of the new batch) == flax momentum 0.9 (weight of the old stats);
    # the running variance moves towards the unbiased batch variance, as torch's.
    return layers.TorchBatchNorm(
        features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4 channels) with a residual connection."""

    def __init__(
        self,
        in_features: int,
        width: int,
        stride: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out = width * EXPANSION
        self.conv1 = _conv(in_features, width, 1, 1, 0, **kw)
        self.bn1 = _bn(width, **kw)
        self.conv2 = _conv(width, width, 3, stride, 1, **kw)
        self.bn2 = _bn(width, **kw)
        self.conv3 = _conv(width, out, 1, 1, 0, **kw)
        self.bn3 = _bn(out, **kw)
        if stride != 1 or in_features != out:
            self.downsample_conv = _conv(in_features, out, 1, stride, 0, **kw)
            self.downsample_bn = _bn(out, **kw)
        else:
            self.downsample_conv = None
            self.downsample_bn = None

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Apply the block to an NHWC feature map."""
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        if self.downsample_conv is not None:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ura)
        # Kept in memory, not recomputed by each later block (XLA:CPU's fusion; see the helper).
        return layers.materialize_on_cpu(nnx.relu(y + x))


class ResNet(nnx.Module):
    """Bottleneck ResNet as a token backbone: returns layer4 flattened to [B, h*w, 8*4*width].

    Attributes:
      num_features: channels of the layer4 map (2048 for the standard width 64).
      pyramid_features: channels of the layer3 and layer4 maps (`pyramid`).
      layers: blocks per stage.
      image_size: the image side the backbone was built for (informational; any size works).
    """

    def __init__(
        self,
        *,
        layers: Sequence[int],
        width: int = 64,
        num_classes: int | None = None,
        image_size: int = 224,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = tuple(int(n) for n in layers)
        self.width = int(width)
        self.image_size = int(image_size)
        self.num_classes = num_classes
        self.conv1 = _conv(3, width, 7, 2, 3, **kw)
        self.bn1 = _bn(width, **kw)
        cin = width
        stages = []
        for i, blocks in enumerate(self.layers):
            w = width * 2**i
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, w, stride if b == 0 else 1, **kw))
                cin = w * EXPANSION
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = cin
        self.pyramid_features = (cin // 2, cin)
        if num_classes is not None:
            self.fc = nnx.Linear(cin, int(num_classes), **kw)
        else:
            self.fc = None

    def pyramid(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, 3] -> (layer3 map [B, H/16, W/16, pyramid_features[0]], layer4 map
        [B, H/32, W/32, pyramid_features[1]]), the stride-16 and stride-32 maps."""
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                x = block(x, train=train)
        stride16 = x
        for block in self.layer4:
            x = block(x, train=train)
        return stride16, x

    def feature_map(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> layer4 map [B, ceil(H/32), ceil(W/32), num_features]."""
        return self.pyramid(x, train=train)[1]

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> tokens [B, h*w, num_features], row-major (h outer, w inner)."""
        f = self.feature_map(x, train=train)
        b, h, w, d = f.shape
        return f.reshape(b, h * w, d)

    def logits(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """ImageNet-style classification: global average pool of layer4, then `fc`."""
        if self.fc is None:
            raise ValueError("this ResNet was built without a classifier (num_classes=None)")
        return self.fc(self.feature_map(x, train=train).mean(axis=(1, 2)))


def create(
    *,
    image_size: int,
    depth: int | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
    num_classes: int | None = None,
    layers: Sequence[int] | None = None,
    width: int = 64,
) -> ResNet:
    """Build a torchvision bottleneck ResNet.

    Args:
      image_size: image side the model is used at (kept as an attribute; any size works).
      depth: 50, 101 or 152; selects the block layout unless `layers` is given.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initialisation keys.
      num_classes: if set, adds the ImageNet-style `fc` head used by `logits`.
      layers: blocks per stage, overriding `depth` (e.g. a reduced layout in tests).
      width: channels of the stem and of the first stage's bottleneck (64 in torchvision).
    """
    if layers is None:
        if depth not in LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(LAYOUTS)}, got {depth!r}")
        layers = LAYOUTS[depth]
    return ResNet(
        layers=layers,
        width=width,
        num_classes=num_classes,
        image_size=image_size,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )

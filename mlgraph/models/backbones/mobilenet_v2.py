"""torchvision MobileNetV2 (width 1.0) in Flax NNX.

`features` mirrors torchvision's `features` Sequential index for index: `features[0]` is the
stem (3x3 conv, stride 2), `features[1..17]` the inverted residual blocks, `features[18]` the
final 1x1 conv to 1280 channels. Inside a block, torchvision's positional `conv.N` names become
`expand` (absent when the expansion ratio is 1), `depthwise` and `project`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlgraph.models import layers

# (expansion t, output channels c, repeats n, first stride s), as in torchvision / the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
DROPOUT = 0.2
# `features` index of the last stride-16 block (the 96-channel stage), the first map of `pyramid`.
STRIDE16_LAST = 13

# torchvision: kaiming_normal_(mode="fan_out") for convs, normal(0, 0.01) for the classifier.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nnx.Module):
    """Conv (no bias, PyTorch padding) -> BatchNorm -> optional ReLU6 (`Conv2dNormActivation`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        pad = (kernel - 1) // 2
        self.activation = activation
        self.stride, self.pad = stride, pad
        self.depthwise = groups == in_features == out_features and groups > 1
        self.conv = nnx.Conv(
            in_features,
            out_features,
            (kernel, kernel),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=False,
            kernel_init=_conv_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            out_features,
            momentum=0.9,
            epsilon=1e-5,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Apply conv, batch norm and (if enabled) ReLU6 to an NHWC map."""
        if self.depthwise and layers.target_platform() == "cpu":
            y = depthwise_conv(x, self.conv.kernel[...], self.stride, self.pad, self.conv.dtype)
        else:
            y = self.conv(x)
        y = self.bn(y, use_running_average=not train)
        return jnp.clip(y, 0.0, 6.0) if self.activation else y


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, stride: int, pad: int, dtype=jnp.float32
) -> jax.Array:
    """A depthwise convolution (kernel [k, k, 1, C], no bias) as a sum of k*k shifted, scaled
    copies of the padded map: the same values as `lax.conv_general_dilated` with
    `feature_group_count=C`, which XLA's CPU backend runs many times slower."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h = (xp.shape[1] - k) // stride + 1
    w = (xp.shape[2] - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            window = xp[
                :, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride
            ]
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class InvertedResidual(nnx.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), residual when shapes allow."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stride: int,
        expand_ratio: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(round(in_features * expand_ratio))
        self.use_residual = stride == 1 and in_features == out_features
        self.expand = ConvBN(in_features, hidden, 1, **kw) if expand_ratio != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, **kw)
        self.project = ConvBN(hidden, out_features, 1, activation=False, **kw)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Apply the block to an NHWC map."""
        y = x if self.expand is None else self.expand(x, train=train)
        y = self.project(self.depthwise(y, train=train), train=train)
        return x + y if self.use_residual else y


class MobileNetV2(nnx.Module):
    """MobileNetV2 as a token backbone: the final 1280-channel map flattened to [B, h*w, 1280].

    Attributes:
      num_features: 1280.
      pyramid_features: channels of the stride-16 and stride-32 maps of `pyramid` (96, 1280).
      image_size: the image side the backbone was built for (informational; any size works).
    """

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        image_size: int = 224,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_size = int(image_size)
        self.num_classes = num_classes
        features: list[nnx.Module] = [ConvBN(3, STEM_CHANNELS, 3, 2, **kw)]
        cin = STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, **kw))
                cin = c
        features.append(ConvBN(cin, LAST_CHANNELS, 1, **kw))
        self.features = nnx.List(features)
        self.num_features = LAST_CHANNELS
        self.pyramid_features = (INVERTED_RESIDUAL_SETTING[4][1], LAST_CHANNELS)
        if num_classes is not None:
            self.dropout = nnx.Dropout(DROPOUT)
            self.classifier = nnx.Linear(
                LAST_CHANNELS,
                int(num_classes),
                kernel_init=nnx.initializers.normal(0.01),
                **kw,
            )
        else:
            self.dropout = None
            self.classifier = None

    def pyramid(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, 3] -> (the last stride-16 map [B, H/16, W/16, 96], the final map
        [B, H/32, W/32, 1280]): the outputs of `features[13]` and `features[18]`."""
        stride16 = None
        for i, layer in enumerate(self.features):
            x = layer(x, train=train)
            if i == STRIDE16_LAST:
                stride16 = x
        return stride16, x

    def feature_map(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> final map [B, ceil(H/32), ceil(W/32), 1280]."""
        return self.pyramid(x, train=train)[1]

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> tokens [B, h*w, 1280], row-major (h outer, w inner)."""
        f = self.feature_map(x, train=train)
        b, h, w, d = f.shape
        return f.reshape(b, h * w, d)

    def logits(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """ImageNet-style classification: global average pool, Dropout(0.2), `classifier`.

        `rngs` supplies the dropout key and is needed only when `train` is True.
        """
        if self.classifier is None:
            raise ValueError("this MobileNetV2 was built without a classifier (num_classes=None)")
        pooled = self.feature_map(x, train=train).mean(axis=(1, 2))
        return self.classifier(self.dropout(pooled, deterministic=not train, rngs=rngs))


def create(
    *,
    image_size: int,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
    num_classes: int | None = None,
) -> MobileNetV2:
    """Build a torchvision MobileNetV2 (width multiplier 1.0).

    Args:
      image_size: image side the model is used at (kept as an attribute; any size works).
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initialisation keys.
      num_classes: if set, adds the ImageNet-style classifier used by `logits`.
    """
    return MobileNetV2(
        num_classes=num_classes,
        image_size=image_size,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )

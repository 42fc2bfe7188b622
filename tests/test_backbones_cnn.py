"""CNN backbones (ResNet, MobileNetV2) against plain-torch references with torchvision's key names.

The references below are written with torch.nn only (torchvision does not work here) and follow
torchvision's module names, so their `state_dict()` has the same keys as torchvision's files.
Weights and BatchNorm running statistics are random (mean 0 / var 1 would hide a swapped pair).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgraph.convert import torchvision_mobilenet_v2, torchvision_resnet
from mlgraph.convert.pretrained import imagenet_class_names, mobilenet_v2_imagenet_path
from mlgraph.models import backbones
from mlgraph.models.backbones import resnet
from mlgraph.torch_reference.layers import TorchBottleneck

torch = pytest.importorskip("torch")
nn = torch.nn

RTOL = 1e-4


# ----------------------------------------------------------------------------- torch references
class TorchResNet(nn.Module):
    """torchvision.models.resnet.ResNet with Bottleneck blocks and a configurable stem width."""

    def __init__(self, layers, width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = width
        for i, n in enumerate(layers):
            w = width * 2**i
            blocks = []
            for b in range(n):
                blocks.append(TorchBottleneck(inp, w, (1 if i == 0 else 2) if b == 0 else 1))
                inp = w * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)

    def layer4_map(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer4_map(x)), 1))


def _conv_bn_act(inp, oup, k, s=1, groups=1):
    """torchvision Conv2dNormActivation: keys .0 (conv) and .1 (bn)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, k, s, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(),
    )


class TorchInvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual."""

    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = int(round(inp * t))
        self.use_res = stride == 1 and inp == oup
        layers = [] if t == 1 else [_conv_bn_act(inp, hidden, 1)]
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class TorchMobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 (width 1.0)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2]]
        setting += [[6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        feats, inp = [_conv_bn_act(3, 32, 3, 2)], 32
        for t, c, n, s in setting:
            for i in range(n):
                feats.append(TorchInvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        feats.append(_conv_bn_act(inp, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------------- helpers
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model.eval()


def state_dict_np(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays, as `io.read_state_dict` returns it."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_diff(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@nnx.jit(static_argnames="train")
def tokens_fn(model, x, train=False):
    """Jitted `model(x)`: one compile is much cheaper than eager op-by-op compiles on CPU."""
    return model(x, train=train)


@nnx.jit
def outputs_fn(model, x):
    """Jitted (tokens, logits) in eval mode; XLA shares the common forward pass."""
    return model(x), model.logits(x)


def images(seed: int, h: int, w: int, batch: int = 2) -> tuple[np.ndarray, torch.Tensor]:
    """The same random batch as NHWC numpy and NCHW torch."""
    x = np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


# ----------------------------------------------------------------------------- registry
def test_registry_rejects_unknown_name():
    assert {k: v for k, v in backbones.BACKBONES.items() if k != "simple_cnn"} == {
        "resnet50": ("resnet", {"depth": 50}),
        "resnet101": ("resnet", {"depth": 101}),
        "resnet152": ("resnet", {"depth": 152}),
        "mobilenet_v2": ("mobilenet_v2", {}),
        "vit_b16": ("vit", {"variant": "B/16"}),
        "vit_l16": ("vit", {"variant": "L/16"}),
        "clip_vit_b16": ("clip", {"variant": "ViT-B/16"}),
    }
    with pytest.raises(ValueError) as e:
        backbones.build("resnet18", image_size=64, rngs=nnx.Rngs(0))
    assert str(e.value) == (
        f"unknown backbone 'resnet18'; valid names: {', '.join(sorted(backbones.BACKBONES))}"
    )
    assert "mobilenet_v2, resnet101, resnet152, resnet50" in str(e.value)


def _abstract(name: str, **kwargs):
    """Build under `nnx.eval_shape`: eager random init compiles one kernel per shape (slow)."""
    return nnx.eval_shape(lambda: backbones.build(name, rngs=nnx.Rngs(0), **kwargs))


def _out(fn, model, x):
    """Output shape/dtype of `fn(model, x)` without computing it."""
    return nnx.eval_shape(fn, model, x)


def test_registry_builds_resnet_with_overrides():
    model = _abstract("resnet101", image_size=64, width=4, layers=(1, 2, 3, 1))
    assert isinstance(model, resnet.ResNet)
    assert model.layers == (1, 2, 3, 1) and model.image_size == 64
    assert model.num_features == 4 * 8 * 4
    assert model.fc is None
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    assert _out(lambda m, x: m(x), model, x).shape == (2, 2 * 3, 128)
    assert _out(lambda m, x: m.feature_map(x), model, x).shape == (2, 2, 3, 128)
    with pytest.raises(ValueError, match="built without a classifier"):
        _out(lambda m, x: m.logits(x), model, x)
    bf16 = _abstract("resnet50", image_size=32, dtype=jnp.bfloat16, width=4, num_classes=3)
    assert bf16.layers == (3, 4, 6, 3)
    assert bf16.conv1.kernel.dtype == jnp.float32
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    assert _out(lambda m, x: m(x), bf16, x).dtype == jnp.bfloat16
    assert _out(lambda m, x: m.logits(x), bf16, x).shape == (1, 3)


def test_registry_builds_standard_depths():
    assert resnet.LAYOUTS == {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
    r50 = _abstract("resnet50", image_size=448)
    assert r50.layers == (3, 4, 6, 3) and r50.num_features == 2048 and r50.fc is None
    assert r50.layer2[0].conv2.strides == 2 and r50.layer2[0].conv1.strides == 1
    mnv2 = _abstract("mobilenet_v2", image_size=224, num_classes=1000)
    assert mnv2.num_features == 1280 and len(mnv2.features) == 19
    assert mnv2.classifier.kernel.shape == (1280, 1000)


def test_resnet_depth_must_be_bottleneck():
    with pytest.raises(ValueError, match=r"ResNet depth must be one of \[50, 101, 152\], got 34"):
        resnet.create(image_size=64, depth=34, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    "layers, width, expected",
    [
        ((3, 4, 6, 3), 8, {"backbone": "resnet50"}),
        ((1, 2, 3, 1), 8, {"backbone": "resnet50", "layers": [1, 2, 3, 1]}),
    ],
    ids=["resnet50-layout", "reduced-resnet101-layout"],
)
def test_resnet_parity_with_torch(layers, width, expected):
    ref = randomize(TorchResNet(layers, width=width, num_classes=10), seed=sum(layers))
    module, settings = torchvision_resnet.convert(state_dict_np(ref), {})
    assert settings == {"kind": "backbone", **expected, "width": width, "num_classes": 10}
    x, xt = images(0, 64, 96)  # h != w so that a transposed token order would show
    with torch.no_grad():
        fmap = ref.layer4_map(xt)
        ref_tokens = fmap.flatten(2).transpose(1, 2).numpy()
        ref_logits = ref(xt).numpy()
    tokens, logits = outputs_fn(module, jnp.asarray(x))
    assert tokens.shape == ref_tokens.shape == (2, 2 * 3, width * 32)
    assert module.num_features == width * 32
    d_tok = rel_diff(tokens, ref_tokens)
    d_log = rel_diff(logits, ref_logits)
    print(f"\nResNet {layers} width {width}: rel diff tokens {d_tok:.2e}, logits {d_log:.2e}")
    assert d_tok < RTOL and d_log < RTOL
    if layers == (1, 2, 3, 1):
        # Batch statistics (train=True) give a clearly different output: running stats matter.
        assert rel_diff(tokens_fn(nnx.clone(module), jnp.asarray(x), True), ref_tokens) > 1e-2


@pytest.fixture(scope="module")
def mobilenet_pair():
    """A random torch MobileNetV2 and its conversion (shared: building them is the slow part)."""
    ref = randomize(TorchMobileNetV2(num_classes=1000), seed=3)
    sd = state_dict_np(ref)
    assert len(sd) == 314  # the key count of torchvision's file
    module, settings = torchvision_mobilenet_v2.convert(sd, {})
    return ref, module, settings


def test_mobilenet_v2_parity_with_torch(mobilenet_pair):
    ref, module, settings = mobilenet_pair
    assert settings == {"kind": "backbone", "backbone": "mobilenet_v2", "num_classes": 1000}
    x, xt = images(1, 224, 224)  # the photo test's shape: the jitted functions are reused
    with torch.no_grad():
        ref_tokens = ref.features(xt).flatten(2).transpose(1, 2).numpy()
        ref_logits = ref(xt).numpy()
    tokens, logits = outputs_fn(module, jnp.asarray(x))
    assert tokens.shape == ref_tokens.shape == (2, 7 * 7, 1280)
    d_tok = rel_diff(tokens, ref_tokens)
    d_log = rel_diff(logits, ref_logits)
    print(f"\nMobileNetV2: rel diff tokens {d_tok:.2e}, logits {d_log:.2e}")
    assert d_tok < RTOL and d_log < RTOL
    n_params = sum(p.numel() for p in ref.parameters())
    assert n_params == 3_504_872
    assert sum(v.size for v in jax.tree.leaves(nnx.state(module, nnx.Param))) == n_params


def test_mobilenet_v2_dropout_in_training(mobilenet_pair):
    _, module, _ = mobilenet_pair
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    @nnx.jit
    def train_logits(model, x, rngs):
        return model.logits(x, train=True, rngs=rngs)

    # train=True also updates the BN running statistics, hence a fresh clone per call. Eval mode
    # (no dropout) is covered by the torch parity test above.
    a1 = np.asarray(train_logits(nnx.clone(module), x, nnx.Rngs(dropout=1)))
    a2 = np.asarray(train_logits(nnx.clone(module), x, nnx.Rngs(dropout=1)))
    b = np.asarray(train_logits(nnx.clone(module), x, nnx.Rngs(dropout=2)))
    np.testing.assert_array_equal(a1, a2)
    assert np.abs(a1 - b).max() > 1e-2 * np.abs(a1).max()


# ----------------------------------------------------------------------------- real weights
def _imagenet_batch(names: list[str]) -> np.ndarray:
    """skimage photos resized to 224 with PIL bilinear, ImageNet mean/std, NHWC float32."""
    from PIL import Image
    from skimage import data

    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img = img.resize((224, 224), Image.BILINEAR)
        out.append((np.asarray(img, np.float32) / 255.0 - mean) / std)
    return np.stack(out)


def test_shipped_mobilenet_v2_classifies_photos():
    from mlgraph.convert.io import read_state_dict

    sd = read_state_dict(mobilenet_v2_imagenet_path())
    module, settings = torchvision_mobilenet_v2.convert(sd, {})
    assert settings["num_classes"] == 1000
    x = _imagenet_batch(["chelsea", "coffee"])
    logits = np.asarray(outputs_fn(module, jnp.asarray(x))[1])
    ref = TorchMobileNetV2().eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    d = rel_diff(logits, ref_logits)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    top1 = logits.argmax(-1)
    names = imagenet_class_names()
    print(
        f"\nshipped MobileNetV2: rel diff logits {d:.2e}; chelsea -> {top1[0]} {names[top1[0]]} "
        f"{probs[0, top1[0]]:.2f}, coffee -> {top1[1]} {names[top1[1]]} {probs[1, top1[1]]:.2f}"
    )
    assert d < RTOL
    np.testing.assert_array_equal(top1, ref_logits.argmax(-1))
    assert 281 <= top1[0] <= 285  # the domestic cat classes (tabby .. Egyptian cat)
    assert top1[1] == 967 and names[967] == "espresso"
    assert probs[1, 967] > 0.9

"""SALGL training augmentations: RandAugment (randaugment==1.0.2 behaviour), CutoutPIL and the
TrainTransform chain (docs/salgl.md §3.4)."""

from __future__ import annotations

import collections
import dataclasses
import json

import grain
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from skimage import data as skdata
from train_helpers import REPO, load_config

from mlgraph.config_lib import IMAGENET_MEAN, IMAGENET_STD, base_config
from mlgraph.data import augment as A
from mlgraph.data.pipeline import TrainTransform
from mlgraph.errors import ConfigError

Step = A.RandAugmentStep


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A small non-square RGB photo (astronaut, 48 x 40)."""
    return Image.fromarray(skdata.astronaut()).resize((48, 40), Image.BILINEAR)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


class _FixedRng:
    """Stands in for a Generator where a test needs chosen draws (cutout geometry)."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, low, high=None, size=None):
        if size is None:
            return self.values.pop(0)
        return np.array([self.values.pop(0) for _ in range(size)])


# --- magnitude tables -------------------------------------------------------------------


def test_magnitude_tables():
    levels = range(1, 10)
    assert [A.rand_augment_magnitude("Posterize", lv) for lv in levels] == [
        8, 7, 7, 6, 6, 5, 5, 4, 4
    ]  # fmt: skip
    assert [A.rand_augment_magnitude("Cutout", lv) for lv in levels] == [
        2, 4, 7, 9, 11, 13, 16, 18, 20
    ]  # fmt: skip
    for lv in levels:
        assert A.rand_augment_magnitude("ShearX", lv) == pytest.approx(0.3 * lv / 9)
        assert A.rand_augment_magnitude("TranslateY", lv) == pytest.approx(150 / 331 * lv / 9)
        assert A.rand_augment_magnitude("Rotate", lv) == pytest.approx(30 * lv / 9)
        assert A.rand_augment_magnitude("Solarize", lv) == pytest.approx(256 - 256 * lv / 9)
        for op in ("Color", "Contrast", "Sharpness", "Brightness"):
            assert A.rand_augment_magnitude(op, lv) == pytest.approx(0.9 * lv / 9)
    assert A.rand_augment_magnitude("Solarize", 9) == 0.0
    assert len(A.RAND_AUGMENT_OPS) == 15 and A.NUM_ENTRIES == 135


def test_magnitude_bad_input():
    with pytest.raises(ValueError, match=r"unknown RandAugment op 'Blur'"):
        A.rand_augment_magnitude("Blur", 3)
    with pytest.raises(ValueError, match=r"RandAugment level 0 for Rotate: expected an integer"):
        A.rand_augment_magnitude("Rotate", 0)
    with pytest.raises(ValueError, match=r"expects an RGB image, got mode 'L'"):
        A.rand_augment(Image.new("L", (8, 8)), np.random.default_rng(0))


# --- each op against an independent expectation ------------------------------------------


def test_invert(photo):
    out = A.apply_rand_augment_op(photo, Step("Invert", 4))
    np.testing.assert_array_equal(_arr(out), 255 - _arr(photo))


@pytest.mark.parametrize("level", [1, 5, 9])
def test_solarize(photo, level):
    thr = 256 - 256 * level / 9
    x = _arr(photo)
    out = A.apply_rand_augment_op(photo, Step("Solarize", level))
    np.testing.assert_array_equal(_arr(out), np.where(x < thr, x, 255 - x))


@pytest.mark.parametrize("level,bits", [(1, 8), (3, 7), (5, 6), (9, 4)])
def test_posterize(photo, level, bits):
    out = A.apply_rand_augment_op(photo, Step("Posterize", level))
    np.testing.assert_array_equal(_arr(out), _arr(photo) & (0xFF << (8 - bits) & 0xFF))


def test_autocontrast(photo):
    x = _arr(photo)
    out = _arr(A.apply_rand_augment_op(photo, Step("AutoContrast", 2)))
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    expected = np.floor((x - lo) * 255.0 / (hi - lo))
    assert np.abs(out - expected).max() <= 1
    np.testing.assert_array_equal(out.min(axis=(0, 1)), [0, 0, 0])
    np.testing.assert_array_equal(out.max(axis=(0, 1)), [255, 255, 255])


def test_equalize(photo):
    x = _arr(photo)
    expected = np.empty_like(x)
    for c in range(3):  # PIL's per-band histogram equalisation, written out
        hist = np.bincount(x[..., c].ravel(), minlength=256)
        last = hist[np.nonzero(hist)[0][-1]]
        step = (hist.sum() - last) // 255
        lut = np.clip((step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step, 0, 255)
        expected[..., c] = lut[x[..., c]]
    out = A.apply_rand_augment_op(photo, Step("Equalize", 7))
    np.testing.assert_array_equal(_arr(out), expected)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("level", [2, 9])
def test_brightness(photo, level, sign):
    factor = 1 + sign * 0.9 * level / 9
    out = _arr(A.apply_rand_augment_op(photo, Step("Brightness", level, sign)))
    assert np.abs(out - np.clip(np.trunc(_arr(photo) * factor), 0, 255)).max() <= 1


@pytest.mark.parametrize("op", ["Color", "Contrast", "Sharpness", "Brightness"])
@pytest.mark.parametrize("level,sign", [(1, 1), (4, -1), (9, -1), (9, 1)])
def test_enhance_factor(photo, op, level, sign):
    factor = 1 + sign * 0.9 * level / 9  # 1 +- 0.1 * level
    enhancer = getattr(ImageEnhance, op)
    out = A.apply_rand_augment_op(photo, Step(op, level, sign))
    np.testing.assert_array_equal(_arr(out), _arr(enhancer(photo).enhance(factor)))
    assert not np.array_equal(_arr(out), _arr(photo))


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY"])
@pytest.mark.parametrize("level,sign", [(3, 1), (9, -1)])
def test_affine_ops(photo, op, level, sign):
    w, h = photo.size
    m = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331, "TranslateY": 150 / 331}[op]
    m *= sign * level / 9
    coeffs = {
        "ShearX": (1, m, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, m, 1, 0),
        "TranslateX": (1, 0, m * w, 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, m * h),
    }[op]
    resample = Image.BICUBIC if op.startswith("Shear") else Image.NEAREST
    expected = photo.transform(photo.size, Image.AFFINE, coeffs, resample, fillcolor=(128,) * 3)
    out = A.apply_rand_augment_op(photo, Step(op, level, sign))
    np.testing.assert_array_equal(_arr(out), _arr(expected))


@pytest.mark.parametrize("sign", [1, -1])
def test_translate_x_shifts_columns(photo, sign):
    w = photo.size[0]
    t = sign * 150 / 331 * 5 / 9 * w
    src = np.floor(np.arange(w) + 0.5 + t).astype(int)  # nearest source column per output
    inside = (src >= 0) & (src < w)
    out = _arr(A.apply_rand_augment_op(photo, Step("TranslateX", 5, sign)))
    np.testing.assert_array_equal(out[:, inside], _arr(photo)[:, src[inside]])
    assert (out[:, ~inside] == 128).all() and (~inside).sum() == 12


@pytest.mark.parametrize("level", [1, 6, 9])
def test_rotate(photo, level):
    angle = 30 * level / 9
    # The package's recipe: rotate an RGBA copy, composite over grey with its alpha.
    rot = photo.convert("RGBA").rotate(angle)
    expected = Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB")
    out = A.apply_rand_augment_op(photo, Step("Rotate", level))
    np.testing.assert_array_equal(_arr(out), _arr(expected))
    np.testing.assert_array_equal(_arr(out)[0, 0], [128, 128, 128])
    # Counter-clockwise: PIL's own rotation by the same positive angle.
    np.testing.assert_array_equal(
        _arr(out), _arr(photo.rotate(angle, Image.NEAREST, fillcolor=(128, 128, 128)))
    )


@pytest.mark.parametrize("center,level", [((20, 17), 9), ((0, 39), 4), ((47, 0), 3)])
def test_rand_augment_cutout(photo, center, level):
    half = [2, 4, 7, 9, 11, 13, 16, 18, 20][level - 1] // 2
    (cx, cy), (w, h) = center, photo.size
    out = _arr(A.apply_rand_augment_op(photo, Step("Cutout", level, center=center)))
    mask = np.zeros((h, w), bool)
    mask[max(0, cy - half) : min(h, cy + half), max(0, cx - half) : min(w, cx + half)] = True
    assert (out[mask] == [125, 122, 113]).all()
    np.testing.assert_array_equal(out[~mask], _arr(photo)[~mask])
    with pytest.raises(ValueError, match="Cutout step needs a center"):
        A.apply_rand_augment_op(photo, Step("Cutout", level))


# --- sampling: determinism and distribution ----------------------------------------------


def test_rand_augment_deterministic(photo):
    outs = [A.rand_augment(photo, np.random.default_rng(s)).tobytes() for s in (7, 7, 8, 9, 10)]
    assert outs[0] == outs[1]
    assert len(set(outs[1:])) > 1


def test_rand_augment_applies_plan_in_order(photo):
    # Find a seed whose two ops both fire and do not commute, then check the order.
    for seed in range(200):
        plan = A.rand_augment_plan(np.random.default_rng(seed), photo.size)
        if len(plan) == 2:
            first = A.apply_rand_augment_op(A.apply_rand_augment_op(photo, plan[0]), plan[1])
            swapped = A.apply_rand_augment_op(A.apply_rand_augment_op(photo, plan[1]), plan[0])
            if first.tobytes() != swapped.tobytes():
                break
    else:
        pytest.fail("no seed with two non-commuting ops in 200 draws")
    out = A.rand_augment(photo, np.random.default_rng(seed))
    assert out.tobytes() == first.tobytes()


def test_rand_augment_distribution():
    n = 20000
    rng = np.random.default_rng(0)
    counts, ops, levels, signs = collections.Counter(), collections.Counter(), [], []
    for _ in range(n):
        plan = A.rand_augment_plan(rng, (60, 30))
        counts[len(plan)] += 1
        for step in plan:
            ops[step.op] += 1
            levels.append(step.level)
            if step.op in A.SIGNED_OPS:
                signs.append(step.sign)
            else:
                assert step.sign == 1
            if step.op == "Cutout":
                assert 0 <= step.center[0] < 60 and 0 <= step.center[1] < 30
            else:
                assert step.center is None
    for k, p in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert abs(counts[k] / n - p) < 0.015, counts
    total = sum(ops.values())
    assert set(ops) == set(A.RAND_AUGMENT_OPS)
    for op in A.RAND_AUGMENT_OPS:
        assert abs(ops[op] / total - 1 / 15) < 0.01, (op, ops[op] / total)
    level_freq = np.bincount(levels, minlength=10)[1:] / len(levels)
    np.testing.assert_allclose(level_freq, 1 / 9, atol=0.01)
    assert abs(np.mean(np.array(signs) == 1) - 0.5) < 0.02


# --- CutoutPIL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,center,rows,cols",
    [
        (448, (200, 300), (88, 312), (188, 412)),  # side int(0.5*448+0.5) = 224: 225 px painted
        (64, (0, 63), (0, 16), (47, 63)),  # clipped at the top/right borders
        (64, (63, 5), (47, 63), (0, 21)),  # clipped at the bottom/left borders
    ],
)
def test_cutout_geometry(size, center, rows, cols):
    img = Image.new("RGB", (size, size), (10, 20, 30))
    cy, cx = center
    out = _arr(A.cutout(img, 0.5, _FixedRng([cy, cx, 200, 100, 50])))
    painted = (out != [10, 20, 30]).any(axis=-1)
    r, c = np.nonzero(painted)
    assert (r.min(), r.max(), c.min(), c.max()) == (*rows, *cols)
    assert painted.sum() == (rows[1] - rows[0] + 1) * (cols[1] - cols[0] + 1)
    assert (out[painted] == [200, 100, 50]).all()


def test_cutout_random_fill_is_one_colour():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    colours = set()
    for seed in range(20):
        out = _arr(A.cutout(img, 0.5, np.random.default_rng(seed)))
        painted = out[(out != 0).any(axis=-1)]
        assert len(painted) and len(np.unique(painted, axis=0)) == 1
        assert len(painted) <= 17 * 17
        colours.add(tuple(painted[0]))
    assert len(colours) == 20


# --- the TrainTransform chain ------------------------------------------------------------


def _aug(cutout: float, randaugment: bool) -> A.Chain:
    """base_config's square resize + flip, with this cutout and RandAugment (or none)."""
    randaugment = A.RandAugment() if randaugment else None
    return A.Chain(geometry=A.Resize(), flip=True, cutout=cutout, randaugment=randaugment)


def _element():
    image = np.asarray(Image.fromarray(skdata.astronaut()).resize((64, 48), Image.BILINEAR))
    return {"image": image, "labels": np.array([1, 0, 1], np.float32)}


def test_train_transform_chain_order():
    size, element = 40, _element()
    on = TrainTransform(size, 3, _aug(0.5, True), IMAGENET_MEAN, IMAGENET_STD)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    for seed in range(6):
        out = on.random_map(element, np.random.default_rng(seed))
        # The order of docs/salgl.md §3.4, written out with the same generator.
        rng = np.random.default_rng(seed)
        img = Image.fromarray(element["image"]).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img = A.rand_augment(A.cutout(img, 0.5, rng), rng)
        expected = (np.asarray(img, np.float64) / 255.0 - mean) / std
        assert out["image"].dtype == np.float32 and out["image"].shape == (size, size, 3)
        np.testing.assert_allclose(out["image"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["labels"], [1, 0, 1])
        lo, hi = (0 - mean) / std, (1 - mean) / std
        assert (out["image"] >= lo - 1e-5).all() and (out["image"] <= hi + 1e-5).all()


def test_train_transform_randaugment_on_vs_off():
    size, element = 40, _element()
    on = TrainTransform(size, 3, _aug(0.5, True), IMAGENET_MEAN, IMAGENET_STD)
    off = TrainTransform(size, 3, _aug(0.5, False), IMAGENET_MEAN, IMAGENET_STD)
    differ = []
    for seed in range(12):
        a = on.random_map(element, np.random.default_rng(seed))["image"]
        b = off.random_map(element, np.random.default_rng(seed))["image"]
        # Same seed: flip and cutout agree, so the images differ iff RandAugment did anything.
        rng = np.random.default_rng(seed)
        _ = rng.random(), rng.integers(size), rng.integers(size), rng.integers(0, 256, size=3)
        plan = A.rand_augment_plan(rng, (size, size))
        differ.append(not np.array_equal(a, b))
        if not plan:
            np.testing.assert_array_equal(a, b)
    assert sum(differ) >= 6


def test_train_transform_in_grain_is_deterministic():
    transform = TrainTransform(32, 3, _aug(0.5, True), IMAGENET_MEAN, IMAGENET_STD)
    source = [_element()] * 6

    def run():
        ds = grain.MapDataset.source(source).seed(3).random_map(transform)
        return np.stack([ds[i]["image"] for i in range(len(source))])

    first, second = run(), run()
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32 and first.shape == (6, 32, 32, 3)
    assert len({first[i].tobytes() for i in range(6)}) == 6


# ---------------------------------------------------------------- ML-GCN's MultiScaleCrop

MLGCN_SCALES = (1.0, 0.875, 0.75, 0.66, 0.5)


def _tsn_candidates(image_w, image_h, input_size, scales, max_distort):
    """Every (left, top, w, h) the original `MultiScaleCrop._sample_crop_size` (TSN, fix_crop
    and more_fix_crop) can return, transcribed from its source."""
    base_size = min(image_w, image_h)
    crop_sizes = [int(base_size * x) for x in scales]
    crop_h = [input_size if abs(x - input_size) < 3 else x for x in crop_sizes]
    crop_w = [input_size if abs(x - input_size) < 3 else x for x in crop_sizes]
    pairs = []
    for i, h in enumerate(crop_h):
        for j, w in enumerate(crop_w):
            if abs(i - j) <= max_distort:
                pairs.append((w, h))
    out = set()
    for cw, ch in pairs:
        w_step, h_step = (image_w - cw) // 4, (image_h - ch) // 4
        offsets = [
            (0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step),
            (2 * w_step, 2 * h_step), (0, 2 * h_step), (4 * w_step, 2 * h_step),
            (2 * w_step, 4 * h_step), (2 * w_step, 0 * h_step), (1 * w_step, 1 * h_step),
            (3 * w_step, 1 * h_step), (1 * w_step, 3 * h_step), (3 * w_step, 3 * h_step),
        ]  # fmt: skip
        out |= {(x, y, cw, ch) for x, y in offsets}
    return out, len(pairs)


@pytest.mark.parametrize("size,input_size,distort", [((640, 480), 448, 2), ((300, 500), 224, 1)])
def test_multiscale_crop_boxes_are_mlgcns(size, input_size, distort):
    want, num_pairs = _tsn_candidates(*size, input_size, MLGCN_SCALES, distort)
    assert num_pairs == (19 if distort == 2 else 13)
    rng = np.random.default_rng(0)
    drawn = collections.Counter(
        A.multiscale_crop_box(*size, input_size, MLGCN_SCALES, distort, rng) for _ in range(6000)
    )
    assert set(drawn) == want  # only ML-GCN's boxes, and every one of them
    for x, y, w, h in drawn:
        assert 0 <= x and x + w <= size[0] and 0 <= y and y + h <= size[1]


def test_multiscale_crop_in_the_train_chain():
    element = _element()  # 64 x 48
    aug = A.Chain(geometry=A.MultiScaleCrop(MLGCN_SCALES, 2), flip=False)
    t = TrainTransform(40, 3, aug, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    for seed in range(4):
        out = t.random_map(element, np.random.default_rng(seed))["image"]
        x, y, w, h = A.multiscale_crop_box(64, 48, 40, MLGCN_SCALES, 2, np.random.default_rng(seed))
        img = Image.fromarray(element["image"]).crop((x, y, x + w, y + h))
        img = img.resize((40, 40), Image.BILINEAR)
        np.testing.assert_allclose(
            out, (np.asarray(img, np.float64) / 255.0 - mean) / std, atol=1e-5
        )


# ---------------------------------------------------------------- SSGRL's crops


def test_ssgrl_random_side_crop_and_center_crop():
    img = Image.fromarray(skdata.astronaut()).resize((90, 70), Image.BILINEAR)
    sides = (40, 36, 32, 24, 20)  # SSGRL's 640 .. 320, divided by 16
    seen = collections.Counter()
    for seed in range(400):
        out = A.random_side_crop(img, 36, 40, sides, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        side = sides[int(rng.integers(5))]
        top, left = int(rng.integers(40 - side + 1)), int(rng.integers(40 - side + 1))
        seen[side] += 1
        want = img.resize((40, 40), Image.BILINEAR).crop((left, top, left + side, top + side))
        np.testing.assert_array_equal(
            np.asarray(out), np.asarray(want.resize((36, 36), Image.BILINEAR))
        )
    assert set(seen) == set(sides)
    # CenterCrop rounds the offset: 40 -> 36 starts at 2; 11 -> 8 at round(1.5) = 2.
    np.testing.assert_array_equal(
        np.asarray(A.center_crop(img, 36, 40)),
        np.asarray(img.resize((40, 40), Image.BILINEAR))[2:38, 2:38],
    )
    np.testing.assert_array_equal(
        np.asarray(A.center_crop(img, 8, 11)),
        np.asarray(img.resize((11, 11), Image.BILINEAR))[2:10, 2:10],
    )


def test_ssgrl_crop_settings_in_the_pipeline():
    from mlgraph.data.pipeline import EvalTransform

    element = _element()
    aug = A.Chain(geometry=A.SideCrop(40, (40, 36, 32)), flip=False)
    out = TrainTransform(36, 3, aug, IMAGENET_MEAN, IMAGENET_STD).random_map(
        element, np.random.default_rng(0)
    )
    assert out["image"].shape == (36, 36, 3)
    ev = EvalTransform(36, 3, IMAGENET_MEAN, IMAGENET_STD, center_crop_from=40).map(element)
    want = A.center_crop(Image.fromarray(element["image"]), 36, 40)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(ev["image"], (np.asarray(want) / 255.0 - mean) / std, atol=1e-5)
    with pytest.raises(ConfigError) as e:
        A.SideCrop(40, ())
    assert str(e.value) == (
        "SideCrop.sides=(): expected one or more crop sides (SSGRL: (640, 576, 512, 384, 320) "
        "from resize=640)"
    )
    with pytest.raises(ConfigError, match=r"SideCrop.sides=\(48,\): larger than resize=40"):
        A.SideCrop(40, (48,))
    with pytest.raises(ConfigError, match="eval_center_crop_from=30: smaller than image_size=36"):
        EvalTransform(36, 3, IMAGENET_MEAN, IMAGENET_STD, center_crop_from=30)


# ---------------------------------------------------------------- the named chains

SSGRL_SIDES = (640, 576, 512, 384, 320)
BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
TIMM_CFG = A.parse_timm_randaugment("rand-m9-mstd0.5-inc1")


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _resize(img: Image.Image) -> Image.Image:
    return img.resize((40, 40), BILINEAR)


# Each row of CHAINS written out with the ops, in the old TrainTransform's order (resize/crop,
# flip, cutout, randaugment, timm randaugment), at 40 px.
BY_HAND = {
    "resize": lambda img, rng: _resize(img),
    "resize_flip": lambda img, rng: _flip(_resize(img), rng),
    "salgl": lambda img, rng: A.rand_augment(A.cutout(_flip(_resize(img), rng), 0.5, rng), rng),
    "q2l": lambda img, rng: A.rand_augment(A.cutout(_resize(img), 0.5, rng), rng),
    "ssgrl": lambda img, rng: A.random_side_crop(img, 40, 640, SSGRL_SIDES, rng, BILINEAR),
    "mlgcn": lambda img, rng: _flip(A.multiscale_crop(img, 40, MLGCN_SCALES, 2, rng), rng),
    "timm": lambda img, rng: A.timm_rand_augment(
        _flip(A.random_resized_crop(img, 40, (0.08, 1.0), (3 / 4, 4 / 3), rng, BICUBIC), rng),
        TIMM_CFG,
        rng,
        BICUBIC,
        A.timm_fill(IMAGENET_MEAN),
    ),
}


@pytest.mark.parametrize("name", list(A.CHAINS))
def test_each_chain_is_its_ops_in_order(name):
    assert set(BY_HAND) == set(A.CHAINS)
    element = _element()
    t = TrainTransform(40, 3, A.chain(name), IMAGENET_MEAN, IMAGENET_STD)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    outs = set()
    for seed in range(8):
        out = t.random_map(element, np.random.default_rng(seed))["image"]
        want = BY_HAND[name](Image.fromarray(element["image"]), np.random.default_rng(seed))
        # One grey level is 1/(255 std) >= 0.017 after normalising: atol 1e-5 means equal pixels.
        np.testing.assert_allclose(out, (np.asarray(want) / 255.0 - mean) / std, atol=1e-5)
        outs.add(out.tobytes())
    # The draws do something: the plain resize has one output, the flip alone two.
    assert len(outs) == {"resize": 1, "resize_flip": 2}.get(name, 8)


def test_chain_rows():
    c = A.CHAINS
    assert c["resize"] == A.Chain(geometry=A.Resize(), flip=False)
    assert c["resize_flip"] == A.chain(base_config().data.augment)
    assert c["salgl"] == _aug(0.5, True)
    assert c["q2l"] == dataclasses.replace(c["salgl"], flip=False)
    assert c["ssgrl"].geometry == A.SideCrop(640, SSGRL_SIDES) and not c["ssgrl"].flip
    assert c["mlgcn"].geometry == A.MultiScaleCrop(MLGCN_SCALES, 2) and c["mlgcn"].flip
    assert c["timm"].geometry == A.RandomResizedCrop((0.08, 1.0), (0.75, 1.3333333333333333))
    assert c["timm"].randaugment.parsed == TIMM_CFG
    assert c["timm"].interpolation == "bicubic"
    # Strings that parse alike behave alike, so they compare equal.
    assert A.TimmRandAugment("rand-m9-mstd0.5-inc1") == A.TimmRandAugment("rand-inc1-mstd0.5-m9")


def test_recipes_and_configs_name_their_chains():
    from mlgraph import recipes

    assert base_config().data.augment == "resize_flip"
    salgl = recipes.salgl(dataset="coco2014", image_size=448, backbone="resnet101", num_scenes=6)
    assert salgl.data.augment == "salgl"
    assert recipes.q2l(dataset="coco2014", image_size=448).data.augment == "q2l"
    assert recipes.ssgrl(dataset="coco2014").data.augment == "ssgrl"
    assert recipes.mlgcn(dataset="coco2014").data.augment == "mlgcn"
    assert recipes.sigrl_ov().data.augment == "timm"
    assert load_config("ssgrl_demo").data.augment == "resize"
    for path in sorted((REPO / "configs").glob("*.py")):
        A.chain(load_config(path.stem).data.augment)  # every config names a chain


def test_unknown_chain_name():
    with pytest.raises(ConfigError) as e:
        A.chain("nope")
    assert str(e.value) == (
        "config.data.augment='nope': unknown; expected one of resize, resize_flip, salgl, q2l, "
        "ssgrl, mlgcn, timm"
    )


def test_chain_values_are_checked():
    def error(build) -> str:
        with pytest.raises(ConfigError) as e:
            build()
        return str(e.value)

    assert error(lambda: A.Chain(geometry=A.Resize(), flip=True, cutout=1.5)) == (
        "Chain.cutout=1.5: expected a share of the image side in [0, 1] (SALGL: 0.5; 0 = off)"
    )
    assert error(lambda: A.Chain(geometry=A.RandAugment(), flip=True)) == (
        "Chain.geometry=RandAugment(): expected Resize, MultiScaleCrop, SideCrop or "
        "RandomResizedCrop"
    )
    assert error(lambda: A.Chain(geometry=A.Resize(), flip=True, randaugment=A.Resize())) == (
        "Chain.randaugment=Resize(): expected None, RandAugment() or TimmRandAugment(config)"
    )
    assert error(lambda: A.MultiScaleCrop((1.0, 0.0))) == (
        "MultiScaleCrop.scales=(1.0, 0.0): expected shares of the shorter side in (0, 1], e.g. "
        "ML-GCN's (1.0, 0.875, 0.75, 0.66, 0.5)"
    )
    assert error(lambda: A.MultiScaleCrop((1.0,), -1)) == (
        "MultiScaleCrop.max_distort=-1: expected a scale-index gap >= 0 (ML-GCN: 2)"
    )
    with pytest.raises(TypeError, match="chain: expected an augment.Chain, got str"):
        TrainTransform(40, 3, "salgl", IMAGENET_MEAN, IMAGENET_STD)


# `config.data.augment` of each old recipe, as a saved config.json gives it back (lists).
OLD_DEFAULTS = {
    "flip": True,
    "cutout": 0.0,
    "randaugment": False,
    "multiscale_crop": (),
    "max_distort": 2,
    "crop_resize": 0,
    "crop_sides": (),
    "random_resized_crop": (),
    "random_resized_crop_ratio": (3 / 4, 4 / 3),
    "interpolation": "bilinear",
    "timm_randaugment": "",
}
OLD_RECIPES = {
    "resize": dict(flip=False),
    "resize_flip": {},
    "salgl": dict(cutout=0.5, randaugment=True),
    "q2l": dict(cutout=0.5, randaugment=True, flip=False),
    "ssgrl": dict(flip=False, crop_resize=640, crop_sides=SSGRL_SIDES),
    "mlgcn": dict(multiscale_crop=MLGCN_SCALES, max_distort=2),
    "timm": dict(
        random_resized_crop=(0.08, 1.0),
        interpolation="bicubic",
        timm_randaugment="rand-m9-mstd0.5-inc1",
    ),
}


def _saved(**switches) -> dict:
    return json.loads(json.dumps({**OLD_DEFAULTS, **switches}))


@pytest.mark.parametrize("name", list(OLD_RECIPES))
def test_chain_name_of_old_recipes(name):
    saved = _saved(**OLD_RECIPES[name])
    assert isinstance(saved["crop_sides"], list)
    assert A.chain_name_of(saved) == name


def test_chain_name_of_fills_defaults_and_ignores_unused_switches():
    # Saved before the SigRL switches existed.
    old = {k: v for k, v in _saved(cutout=0.5, randaugment=True).items() if "random" not in k}
    del old["interpolation"]
    assert A.chain_name_of(old) == "salgl"
    assert A.chain_name_of({}) == "resize_flip"
    assert A.chain_name_of(_saved(max_distort=3)) == "resize_flip"  # no multiscale crop
    assert A.chain_name_of(_saved(random_resized_crop_ratio=[0.5, 2.0], flip=False)) == "resize"


def test_chain_name_of_no_match():
    with pytest.raises(ConfigError) as e:
        A.chain_name_of({"flip": True, "cutout": 0.3})
    assert str(e.value) == (
        "config.data.augment={'flip': True, 'cutout': 0.3} (switches saved by an earlier "
        "version): no chain in mlgraph.data.augment.CHAINS behaves so; the chains: resize, "
        "resize_flip, salgl, q2l, ssgrl, mlgcn, timm"
    )
    unmatched = [
        _saved(interpolation="bicubic"),
        _saved(multiscale_crop=MLGCN_SCALES, max_distort=1),
        _saved(crop_resize=640, crop_sides=[640, 576]),
        _saved(**OLD_RECIPES["timm"], randaugment=True),  # alternatives the old code refused
        _saved(multiscale_crop=[1.0], random_resized_crop=[0.08, 1.0]),
        _saved(timm_randaugment="rand-m9-w0"),  # does not parse
        _saved(crop_resize=640),  # crop_sides missing
        {"flip": True, "colour_jitter": 0.4},  # not an old switch
    ]
    for saved in unmatched:
        with pytest.raises(ConfigError, match="no chain in mlgraph.data.augment.CHAINS"):
            A.chain_name_of(saved)

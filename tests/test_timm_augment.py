"""SigRL's timm 0.6.12 transforms (docs/sigrl.md §3.3): RandomResizedCrop, timm's RandAugment
('rand-m9-mstd0.5-inc1') and the shorter-side resize -> centre crop test transform.

timm cannot be installed here; the expected values are worked out by hand from timm's
`auto_augment.py` formulas (level = M / 10, `_LEVEL_DENOM`) and checked against direct PIL calls.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from skimage import data as skdata

from mlgraph.config_lib import IMAGENET_MEAN, IMAGENET_STD, base_config
from mlgraph.data import augment as A
from mlgraph.data.pipeline import EvalTransform, TrainTransform
from mlgraph.errors import ConfigError

FILL = (124, 116, 104)  # timm's img_mean: round(255 * ImageNet mean)
BICUBIC = Image.Resampling.BICUBIC
SIGRL = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A small non-square RGB photo (astronaut, 40 x 32)."""
    return Image.fromarray(skdata.astronaut()).resize((40, 32), Image.BILINEAR)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


# --- config strings --------------------------------------------------------------------


def test_parse_sigrl_string():
    cfg = A.parse_timm_randaugment(SIGRL)
    assert cfg == A.TimmRandAugmentConfig(
        magnitude=9, num_layers=2, magnitude_std=0.5, magnitude_max=0, increasing=True, prob=0.5
    )
    assert cfg.ops == A.TIMM_RAND_INCREASING_OPS and len(cfg.ops) == 15
    # timm's defaults: M = 10, 2 layers, no noise, the plain op set.
    assert A.parse_timm_randaugment("rand") == A.TimmRandAugmentConfig(10, 2, 0.0, 0, False, 0.5)
    assert A.parse_timm_randaugment("rand").ops == A.TIMM_RAND_OPS


def test_parse_other_sections():
    cfg = A.parse_timm_randaugment("rand-n3-m7-mstd101-mmax12-p0.3")
    assert (cfg.num_layers, cfg.magnitude, cfg.magnitude_max, cfg.prob) == (3, 7, 12, 0.3)
    assert cfg.magnitude_std == math.inf  # timm: mstd > 100 means uniform in [0, M]
    assert not cfg.increasing
    # timm's `if bool(val)` on the string: 'inc0' selects the increasing set too.
    assert A.parse_timm_randaugment("rand-m9-inc0").increasing


@pytest.mark.parametrize(
    "bad", ["augmix-m3", "rand-m9-w0", "rand-m9-foo", "rand-mx9", "rand-m9.5", "rand-inc2",
            "rand-p1.5", "rand--m9", "RAND-m9"],
)  # fmt: skip
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match=r"expected 'rand' then '-'-separated sections m<int>"):
        A.parse_timm_randaugment(bad)


# --- level -> magnitude table at M = 9 --------------------------------------------------


def test_inc1_level_table_at_m9():
    # (value with the sign coin heads, value with it tails) from timm's level functions:
    # Rotate 0.9*30, shear 0.9*0.3, translate 0.9*0.45 (of the width / height),
    # PosterizeIncreasing 4 - int(0.9*4), SolarizeIncreasing 256 - int(0.9*256),
    # SolarizeAdd int(0.9*110), the increasing enhancements max(0.1, 1 +/- 0.9*0.9).
    want = {
        "AutoContrast": (None, None),
        "Equalize": (None, None),
        "Invert": (None, None),
        "Rotate": (27.0, -27.0),
        "PosterizeIncreasing": (1, 1),
        "SolarizeIncreasing": (26, 26),
        "SolarizeAdd": (99, 99),
        "ColorIncreasing": (1.81, 0.19),
        "ContrastIncreasing": (1.81, 0.19),
        "BrightnessIncreasing": (1.81, 0.19),
        "SharpnessIncreasing": (1.81, 0.19),
        "ShearX": (0.27, -0.27),
        "ShearY": (0.27, -0.27),
        "TranslateXRel": (0.405, -0.405),
        "TranslateYRel": (0.405, -0.405),
    }
    assert tuple(want) == A.TIMM_RAND_INCREASING_OPS
    for op, (pos, neg) in want.items():
        for negate, value in ((False, pos), (True, neg)):
            got = A.timm_op_arg(op, 9, negate)
            if value is None or isinstance(value, int):
                assert got == value and type(got) is type(value), op
            else:
                assert got == pytest.approx(value, abs=1e-12), op
    signed = {op for op, (pos, neg) in want.items() if pos != neg}
    assert signed == A.TIMM_SIGNED_OPS


def test_level_table_edges_and_plain_ops():
    # M = 10 (the clip): no bits kept, solarize everything, enhancement clamped at 0.1.
    assert A.timm_op_arg("PosterizeIncreasing", 10) == 0
    assert A.timm_op_arg("SolarizeIncreasing", 10) == 0
    assert A.timm_op_arg("ColorIncreasing", 10, negate=True) == 0.1  # 1 - 0.9 < 0.1
    assert A.timm_op_arg("ColorIncreasing", 10) == pytest.approx(1.9)
    assert A.timm_op_arg("Rotate", 0) == 0.0
    # The plain (decreasing) ops of timm's _RAND_TRANSFORMS at M = 9.
    assert A.timm_op_arg("Posterize", 9) == 3
    assert A.timm_op_arg("Solarize", 9) == 230
    for op in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert A.timm_op_arg(op, 9) == pytest.approx(1.72)
        assert A.timm_op_arg(op, 9, negate=True) == pytest.approx(1.72)  # never negated
    # A noised magnitude goes through the same formulas.
    assert A.timm_op_arg("Rotate", 9.4) == pytest.approx(28.2)
    assert A.timm_op_arg("PosterizeIncreasing", 7.4) == 4 - 2
    with pytest.raises(ValueError, match="unknown timm RandAugment op 'Cutout'"):
        A.timm_op_arg("Cutout", 9)


def test_fill_is_rounded_mean():
    assert A.timm_fill(IMAGENET_MEAN) == FILL
    assert A.timm_fill((0.5, 1.0, 1.2)) == (128, 255, 255)


# --- each op against a direct PIL call -------------------------------------------------


def _direct(op: str, img: Image.Image, sign: int) -> Image.Image:
    """What timm's op functions call, with the M = 9 arguments typed in by hand."""
    w, h = img.size
    affine = Image.Transform.AFFINE
    if op == "Rotate":
        return img.rotate(27.0 * sign, resample=BICUBIC, fillcolor=FILL)
    if op == "ShearX":
        return img.transform(
            img.size, affine, (1, 0.27 * sign, 0, 0, 1, 0), BICUBIC, fillcolor=FILL
        )
    if op == "ShearY":
        return img.transform(
            img.size, affine, (1, 0, 0, 0.27 * sign, 1, 0), BICUBIC, fillcolor=FILL
        )
    if op == "TranslateXRel":
        coeffs = (1, 0, 0.405 * sign * w, 0, 1, 0)
        return img.transform(img.size, affine, coeffs, BICUBIC, fillcolor=FILL)
    if op == "TranslateYRel":
        coeffs = (1, 0, 0, 0, 1, 0.405 * sign * h)
        return img.transform(img.size, affine, coeffs, BICUBIC, fillcolor=FILL)
    if op == "PosterizeIncreasing":
        return ImageOps.posterize(img, 1)
    if op == "SolarizeIncreasing":
        return ImageOps.solarize(img, 26)
    if op == "SolarizeAdd":  # independent of PIL: add 99 below 128, clip at 255
        x = _arr(img)
        return Image.fromarray(np.where(x < 128, np.minimum(x + 99, 255), x).astype(np.uint8))
    factor = 1.81 if sign > 0 else 0.19
    enhancers = {
        "ColorIncreasing": ImageEnhance.Color,
        "ContrastIncreasing": ImageEnhance.Contrast,
        "BrightnessIncreasing": ImageEnhance.Brightness,
        "SharpnessIncreasing": ImageEnhance.Sharpness,
    }
    if op in enhancers:
        return enhancers[op](img).enhance(factor)
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
            "Invert": ImageOps.invert}[op](img)  # fmt: skip


@pytest.mark.parametrize("op", A.TIMM_RAND_INCREASING_OPS)
@pytest.mark.parametrize("negate", [False, True])
def test_op_matches_direct_pil_call(photo, op, negate):
    out = A.apply_timm_op(photo, A.TimmStep(op, 9.0, negate), BICUBIC, FILL)
    want = _direct(op, photo, -1 if negate and op in A.TIMM_SIGNED_OPS else 1)
    assert out.size == photo.size and out.mode == "RGB"
    np.testing.assert_array_equal(_arr(out), _arr(want))


def test_geometric_ops_fill_with_the_mean():
    grey = Image.new("RGB", (40, 32), (10, 200, 30))
    # M = 10: translate by 0.45 * 40 = 18 px (a whole-pixel shift, so bicubic is exact).
    out = _arr(A.apply_timm_op(grey, A.TimmStep("TranslateXRel", 10.0), BICUBIC, FILL))
    assert (out[:, 40 - 18 :] == FILL).all() and (out[:, : 40 - 18] == (10, 200, 30)).all()
    out = _arr(A.apply_timm_op(grey, A.TimmStep("Rotate", 9.0, True), BICUBIC, FILL))
    assert (out[0, 0] == FILL).all() and (out[16, 20] == (10, 200, 30)).all()


# --- the random draws -------------------------------------------------------------------


def test_plan_draw_order_is_timms():
    cfg = A.parse_timm_randaugment(SIGRL)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        want = []
        for index in rng.integers(15, size=2):  # np.random.choice(ops, 2, replace=True)
            op = cfg.ops[index]
            if rng.random() > 0.5:  # AugmentOp: random.random() > prob -> skipped
                continue
            magnitude = min(max(rng.normal(9, 0.5), 0.0), 10.0)  # gauss, then the clip
            negate = op in A.TIMM_SIGNED_OPS and rng.random() > 0.5  # _randomly_negate
            want.append(A.TimmStep(op, magnitude, negate))
        assert A.timm_rand_augment_plan(cfg, np.random.default_rng(seed)) == want


def test_plan_is_reproducible_and_applied_in_order(photo):
    cfg = A.parse_timm_randaugment(SIGRL)
    for seed in range(8):
        a = A.timm_rand_augment(photo, cfg, np.random.default_rng(seed), BICUBIC, FILL)
        b = A.timm_rand_augment(photo, cfg, np.random.default_rng(seed), BICUBIC, FILL)
        np.testing.assert_array_equal(_arr(a), _arr(b))
        want = photo
        for step in A.timm_rand_augment_plan(cfg, np.random.default_rng(seed)):
            want = A.apply_timm_op(want, step, BICUBIC, FILL)
        np.testing.assert_array_equal(_arr(a), _arr(want))
    with pytest.raises(ValueError, match="expects an RGB image, got mode 'L'"):
        A.timm_rand_augment(photo.convert("L"), cfg, np.random.default_rng(0))


def test_plan_statistics():
    n = 20000
    rng = np.random.default_rng(0)
    # p = 1: every drawn op fires, so the plan shows the choices themselves.
    always = A.parse_timm_randaugment("rand-m9-mstd0.5-inc1-p1")
    pairs = [tuple(s.op for s in A.timm_rand_augment_plan(always, rng)) for _ in range(n)]
    counts = collections.Counter(op for pair in pairs for op in pair)
    assert set(counts) == set(A.TIMM_RAND_INCREASING_OPS)
    expected = 2 * n / 15
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())
    repeats = sum(a == b for a, b in pairs) / n  # with replacement: P(same op) = 1/15
    assert abs(repeats - 1 / 15) < 0.006

    cfg = A.parse_timm_randaugment(SIGRL)
    plans = [A.timm_rand_augment_plan(cfg, rng) for _ in range(n)]
    fired = collections.Counter(len(p) for p in plans)  # Binomial(2, 0.5)
    for k, share in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert abs(fired[k] / n - share) < 0.015
    steps = [s for p in plans for s in p]
    mags = np.array([s.magnitude for s in steps])
    assert mags.min() >= 0 and mags.max() == 10.0
    # clip(N(9, 0.5), 0, 10): P(clipped) = 1 - Phi(2) = 0.0228, mean 9 - 0.0042.
    assert abs(np.mean(mags == 10.0) - 0.0228) < 0.005
    assert abs(mags.mean() - 8.9958) < 0.015 and 0.45 < mags.std() < 0.5
    signed = [s.negate for s in steps if s.op in A.TIMM_SIGNED_OPS]
    assert abs(np.mean(signed) - 0.5) < 0.02
    assert not any(s.negate for s in steps if s.op not in A.TIMM_SIGNED_OPS)


def test_magnitude_modes():
    rng = np.random.default_rng(1)
    fixed = A.parse_timm_randaugment("rand-m9-inc1-p1")
    assert {s.magnitude for _ in range(200) for s in A.timm_rand_augment_plan(fixed, rng)} == {9}
    # M above the default bound is clipped to 10 unless mmax raises it.
    capped = A.parse_timm_randaugment("rand-m12-p1")
    assert {s.magnitude for s in A.timm_rand_augment_plan(capped, rng)} == {10}
    high = A.parse_timm_randaugment("rand-m12-mmax12-p1")
    assert {s.magnitude for s in A.timm_rand_augment_plan(high, rng)} == {12}
    uniform = A.parse_timm_randaugment("rand-m9-mstd101-p1")
    mags = np.array(
        [s.magnitude for _ in range(5000) for s in A.timm_rand_augment_plan(uniform, rng)]
    )
    assert mags.min() >= 0 and mags.max() <= 9 and abs(mags.mean() - 4.5) < 0.1
    three = A.parse_timm_randaugment("rand-n3-p1")
    assert len(A.timm_rand_augment_plan(three, rng)) == 3


# --- RandomResizedCrop ------------------------------------------------------------------


def test_rrc_boxes_stay_in_the_ranges():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    areas, ratios, lefts, fallbacks = [], [], set(), 0
    for width, height in ((120, 90), (90, 120), (64, 64)):
        for _ in range(3000):
            x, y, w, h = A.random_resized_crop_box(width, height, scale, ratio, rng)
            assert 0 <= x and x + w <= width and 0 <= y and y + h <= height and w > 0 and h > 0
            if (w, h) == (width, height) and (x, y) == (0, 0):
                fallbacks += 1  # the whole image: a fallback or a full-size draw
            areas.append(w * h / (width * height))
            ratios.append(w / h)
            if (width, height) == (120, 90):
                lefts.add((x, w))
    areas, ratios = np.array(areas), np.array(ratios)
    # Rounding each side to whole pixels moves the area and the ratio a little past the range.
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and areas.min() < 0.1
    assert ratios.min() >= 0.75 * 0.95 and ratios.max() <= 4 / 3 * 1.05
    assert ratios.min() < 0.8 and ratios.max() > 1.25
    assert fallbacks < 200  # rare for these images


def test_rrc_placement_is_uniform_with_end_points():
    rng = np.random.default_rng(0)
    # Area 0.5 * 200 at ratio 1: a 10 x 10 crop of a 20 x 10 image, left in 0..10.
    boxes = collections.Counter(
        A.random_resized_crop_box(20, 10, (0.5, 0.5), (1.0, 1.0), rng) for _ in range(4000)
    )
    assert {b[2:] for b in boxes} == {(10, 10)} and {b[1] for b in boxes} == {0}
    lefts = collections.Counter(b[0] for b in boxes.elements())
    assert sorted(lefts) == list(range(11))
    assert all(abs(c - 4000 / 11) < 5 * math.sqrt(4000 / 11) for c in lefts.values())


def test_rrc_draw_order():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for _ in range(10):
            target = rng.uniform(0.08, 1.0) * 120 * 90
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if w <= 120 and h <= 90:
                top, left = int(rng.integers(90 - h + 1)), int(rng.integers(120 - w + 1))
                break
        want = (left, top, w, h)
        got = A.random_resized_crop_box(
            120, 90, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed)
        )
        assert got == want


@pytest.mark.parametrize(
    ("size", "box"),
    [
        ((100, 40), (23, 0, 53, 40)),  # wider than 4/3: full height, w = round(40 * 4/3)
        ((40, 100), (0, 23, 40, 53)),  # taller than 3/4: full width, h = round(40 / (3/4))
        ((60, 50), (0, 0, 60, 50)),  # aspect inside the range: the whole image
    ],
)
def test_rrc_fallback(size, box):
    # A scale above 1 never fits, so all 10 attempts fail and the centre crop is used.
    rng = np.random.default_rng(0)
    assert A.random_resized_crop_box(*size, (1.5, 2.0), (3 / 4, 4 / 3), rng) == box
    # A 200 x 20 strip cannot hold 90 % of its area at a ratio <= 4/3 either.
    assert A.random_resized_crop_box(200, 20, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (86, 0, 27, 20)


def test_rrc_image(photo):
    out = A.random_resized_crop(photo, 24, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(3))
    x, y, w, h = A.random_resized_crop_box(
        40, 32, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(3)
    )
    want = photo.crop((x, y, x + w, y + h)).resize((24, 24), BICUBIC)
    assert out.size == (24, 24)
    np.testing.assert_array_equal(_arr(out), _arr(want))


# --- the test transform -----------------------------------------------------------------


def _element(width: int, height: int) -> dict:
    image = np.asarray(Image.fromarray(skdata.astronaut()).resize((width, height), Image.BILINEAR))
    return {"image": image, "labels": np.array([1, 0, 1], np.float32)}


def _norm(img: Image.Image) -> np.ndarray:
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    return (np.asarray(img, np.float64) / 255.0 - mean) / std


@pytest.mark.parametrize(
    ("size", "resized", "offset"),
    [
        ((45, 30), (48, 32), (10, 2)),  # landscape: 32 x int(32 * 45 / 30), left round(20 / 2)
        ((30, 45), (32, 48), (2, 10)),  # portrait
        ((39, 30), (41, 32), (6, 2)),  # long side truncated: int(41.6); left round(6.5) = 6
        ((32, 40), (32, 40), (2, 6)),  # already the size: not resampled
    ],
)
def test_eval_shorter_side_then_centre_crop(size, resized, offset):
    element = _element(*size)
    img = Image.fromarray(element["image"])
    assert A.resize_shorter_side(img, 32, BICUBIC).size == resized
    t = EvalTransform(28, 3, IMAGENET_MEAN, IMAGENET_STD, 32, "shorter", "bicubic")
    out = t.map(element)
    assert out["image"].shape == (28, 28, 3)
    big = img if resized == size else img.resize(resized, BICUBIC)
    (left, top) = offset
    want = big.crop((left, top, left + 28, top + 28))
    np.testing.assert_allclose(out["image"], _norm(want), atol=1e-5)


def test_eval_sigrl_sizes_and_defaults():
    element = _element(320, 240)
    config = base_config()
    config.data.eval_center_crop_from, config.data.eval_resize = 256, "shorter"
    config.data.eval_interpolation = "bicubic"
    out = EvalTransform.from_config(config, 3).map(element)  # image_size 224
    img = Image.fromarray(element["image"]).resize((341, 256), BICUBIC)  # int(256 * 4 / 3)
    want = img.crop((58, 16, 58 + 224, 16 + 224))  # round(117 / 2) = 58, 32 / 2 = 16
    np.testing.assert_allclose(out["image"], _norm(want), atol=1e-5)
    assert math.floor(224 / 0.875) == 256  # timm's crop_pct rule
    # 'shorter' without a size: shorter side to image_size, then the crop.
    small = EvalTransform(24, 3, IMAGENET_MEAN, IMAGENET_STD, resize="shorter").map(element)
    want = Image.fromarray(element["image"]).resize((32, 24), Image.BILINEAR).crop((4, 0, 28, 24))
    np.testing.assert_allclose(small["image"], _norm(want), atol=1e-5)
    # The defaults are the plain square bilinear resize, as before.
    plain = EvalTransform.from_config(base_config(), 3).map(element)
    want = Image.fromarray(element["image"]).resize((224, 224), Image.BILINEAR)
    np.testing.assert_allclose(plain["image"], _norm(want), atol=1e-5)


def test_eval_config_errors():
    with pytest.raises(ConfigError) as e:
        EvalTransform(28, 3, IMAGENET_MEAN, IMAGENET_STD, resize="longer")
    assert str(e.value) == (
        "config.data.eval_resize='longer': expected 'square' (resize to a square) or 'shorter' "
        "(shorter side, aspect kept, then the centre crop)"
    )
    with pytest.raises(ConfigError) as e:
        EvalTransform(28, 3, IMAGENET_MEAN, IMAGENET_STD, interpolation="lanczos")
    assert str(e.value) == (
        "config.data.eval_interpolation='lanczos': expected one of bilinear, bicubic"
    )


# --- the training chain -----------------------------------------------------------------


def _sigrl_aug() -> A.Chain:
    return A.Chain(
        geometry=A.RandomResizedCrop((0.08, 1.0)),
        flip=True,
        randaugment=A.TimmRandAugment(SIGRL),
        interpolation="bicubic",
    )


def test_defaults_are_off():
    aug = A.chain(base_config().data.augment)
    assert aug.geometry == A.Resize() and aug.randaugment is None
    assert aug.interpolation == "bilinear"
    data = base_config().data
    assert (data.eval_resize, data.eval_interpolation) == ("square", "bilinear")
    t = TrainTransform(32, 3, aug, IMAGENET_MEAN, IMAGENET_STD)
    assert t.chain.randaugment is None and t.chain.geometry == A.Resize()


def test_train_chain_is_rrc_flip_randaugment():
    element = _element(64, 48)
    t = TrainTransform(32, 3, _sigrl_aug(), IMAGENET_MEAN, IMAGENET_STD)
    cfg = A.parse_timm_randaugment(SIGRL)
    flips = 0
    for seed in range(12):
        out = t.random_map(element, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        img = Image.fromarray(element["image"])
        img = A.random_resized_crop(img, 32, (0.08, 1.0), (3 / 4, 4 / 3), rng, BICUBIC)
        if rng.random() < 0.5:
            img, flips = img.transpose(Image.FLIP_LEFT_RIGHT), flips + 1
        img = A.timm_rand_augment(img, cfg, rng, BICUBIC, FILL)
        assert out["image"].shape == (32, 32, 3)
        np.testing.assert_allclose(out["image"], _norm(img), atol=1e-5)
    assert 0 < flips < 12


def test_train_config_errors():
    def error(build) -> str:
        with pytest.raises(ConfigError) as e:
            build()
        return str(e.value)

    assert error(lambda: A.TimmRandAugment("rand-m9-w0")) == (
        "TimmRandAugment.config='rand-m9-w0': section 'w0': expected 'rand' then "
        "'-'-separated sections m<int> (magnitude, default 10), n<int> (ops per image, default "
        "2), mstd<float> (magnitude noise std; > 100: uniform), mmax<int> (magnitude clip, "
        "default 10), inc<0|1> (increasing ops), p<float> (op probability, default 0.5), e.g. "
        "'rand-m9-mstd0.5-inc1'"
    )
    assert error(lambda: A.TimmRandAugment("m9-mstd0.5")).startswith(
        "TimmRandAugment.config='m9-mstd0.5': expected 'rand' then"
    )
    assert error(lambda: A.Chain(geometry=A.Resize(), flip=True, interpolation="random")) == (
        "Chain.interpolation='random': expected one of bilinear, bicubic"
    )
    assert error(lambda: A.RandomResizedCrop((0.08,))).startswith(
        "RandomResizedCrop.scale=(0.08,): expected (min, max) with 0 < min <= max"
    )
    assert "RandomResizedCrop.ratio=(1.5, 0.5)" in error(
        lambda: A.RandomResizedCrop((0.08, 1.0), (1.5, 0.5))
    )

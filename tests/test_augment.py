"""SALGL training augmentations: RandAugment (randaugment==1.0.2 behaviour), CutoutPIL and the
TrainTransform chain (spec salgl.md §3.4)."""

from __future__ import annotations

import collections

import grain
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from skimage import data as skdata

from mlgraph.config_lib import IMAGENET_MEAN, IMAGENET_STD, base_config
from mlgraph.data import augment as A
from mlgraph.data.pipeline import TrainTransform

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


def _aug(cutout: float, randaugment: bool):
    aug = base_config().data.augment
    aug.cutout, aug.randaugment = cutout, randaugment
    return aug


def _element():
    image = np.asarray(Image.fromarray(skdata.astronaut()).resize((64, 48), Image.BILINEAR))
    return {"image": image, "labels": np.array([1, 0, 1], np.float32)}


def test_train_transform_chain_order():
    size, element = 40, _element()
    on = TrainTransform(size, 3, _aug(0.5, True), IMAGENET_MEAN, IMAGENET_STD)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    for seed in range(6):
        out = on.random_map(element, np.random.default_rng(seed))
        # The spec's order, written out with the same generator.
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
    aug = _aug(0.0, False)
    aug.flip = False
    aug.multiscale_crop = MLGCN_SCALES
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
    from mlgraph.errors import ConfigError

    element = _element()
    aug = _aug(0.0, False)
    aug.flip = False
    aug.crop_resize, aug.crop_sides = 40, (40, 36, 32)
    out = TrainTransform(36, 3, aug, IMAGENET_MEAN, IMAGENET_STD).random_map(
        element, np.random.default_rng(0)
    )
    assert out["image"].shape == (36, 36, 3)
    ev = EvalTransform(36, 3, IMAGENET_MEAN, IMAGENET_STD, center_crop_from=40).map(element)
    want = A.center_crop(Image.fromarray(element["image"]), 36, 40)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(ev["image"], (np.asarray(want) / 255.0 - mean) / std, atol=1e-5)
    aug.crop_sides = ()
    with pytest.raises(ConfigError) as e:
        TrainTransform(36, 3, aug, IMAGENET_MEAN, IMAGENET_STD)
    assert str(e.value) == (
        "config.data.augment.crop_resize and crop_sides go together (SSGRL: 640 and "
        "(640, 576, 512, 384, 320)); got 40 and ()"
    )
    aug.crop_sides = (48,)
    with pytest.raises(ConfigError, match=r"crop_sides=\(48,\): larger than crop_resize=40"):
        TrainTransform(36, 3, aug, IMAGENET_MEAN, IMAGENET_STD)
    aug.crop_sides, aug.multiscale_crop = (40,), (1.0, 0.5)
    with pytest.raises(ConfigError, match="multiscale_crop and crop_sides are alternatives"):
        TrainTransform(36, 3, aug, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ConfigError, match="eval_center_crop_from=30: smaller than image_size=36"):
        EvalTransform(36, 3, IMAGENET_MEAN, IMAGENET_STD, center_crop_from=30)

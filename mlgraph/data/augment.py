"""Image augmentations written with PIL and numpy (the old `randaugment` package does not run
with current numpy/Pillow).

Two augmentations of the SALGL/ASL training chain (docs/salgl.md §3.4) live here:

* `cutout`: ASL's `CutoutPIL`, one large square of a random colour.
* `rand_augment`: the `RandAugment()` class of the PyPI package `randaugment==1.0.2`.

and the methods' crops: ML-GCN's `MultiScaleCrop` (docs/ssgrl_mlgcn.md §3.1, `multiscale_crop`) and
SSGRL's resize -> random crop of a chosen side -> resize (docs/ssgrl_mlgcn.md §1.7,
`random_side_crop`), with its test-time resize -> centre crop (`center_crop`).

SigRL's timm 0.6.12 transforms (docs/sigrl.md §3.3), at the end of the file: `random_resized_crop`
(torchvision/timm `RandomResizedCrop`), `timm_rand_augment` (timm's `rand_augment_transform`,
e.g. 'rand-m9-mstd0.5-inc1') and the shorter-side test resize (`center_crop(...,
shorter_side=True)`). Both RandAugments apply their ops through one `pil_op` per PIL op; they
differ in the op lists, magnitude rules, resampling and fill.

The training chains that combine these, at the end of the file: `Chain` (one geometric step,
flip, cutout, one RandAugment, interpolation) and `CHAINS`, every chain by the name
`config.data.augment` gives (`chain(name)`; `chain_name_of` maps the switch dict that configs
saved by earlier versions hold to its name).

Reference for `rand_augment`: the source of the wheel `randaugment-1.0.2-py3-none-any.whl`
(module `randaugment/randaugment.py`, read via `pip download randaugment==1.0.2 --no-deps`; its
`SubPolicy` op table is the DeepVoltaire/AutoAugment one). What it does, per image:

1. Build the list of 135 (op, level) entries: the 15 ops below x levels 1..9, each with p=0.5.
2. Pick one ordered pair of entries uniformly from the 135 x 135 pairs.
3. Apply the first op with probability 0.5, then the second with probability 0.5.

An op's magnitude is entry `level` of a 10-point `np.linspace` table (index 0 is never used,
since levels start at 1); see `rand_augment_magnitude`. Details docs/salgl.md §3.4 leaves open,
taken from that source:

* Shear is about the image origin (top-left corner), not its centre, with bicubic
  resampling; translation uses nearest-neighbour resampling. Both fill with (128, 128, 128).
* Rotate turns counter-clockwise only (positive PIL angle), nearest-neighbour, about the
  centre; the package rotates an RGBA copy and composites it over grey, which is exactly a
  rotation with fill (128, 128, 128).
* docs/salgl.md §3.4 calls RandAugment's Cutout "grey": the package actually paints (125, 122, 113).
  Its square is centred at a uniform pixel (x in [0, W), y in [0, H)) and covers the
  half-open ranges [c - s//2, c + s//2), clipped to the image, so its side is 2*(s//2).
* The sign of shear, translation and the enhancement factors is one fair coin per applied op.

Randomness comes only from the numpy Generator passed in (grain derives one per example), so
results are reproducible. The package draws from Python's global `random`/`np.random` state,
so its exact stream cannot be reproduced; only the distribution is. Our draw order: pair
index, both op coins, then each applied op's own parameters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from mlgraph.errors import ConfigError

# The package's `RandAugment.get_trans_list()` order: the pair index decodes through it.
RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Invert",
    "Cutout",
    "Sharpness",
    "AutoContrast",
    "Posterize",
    "ShearX",
    "TranslateX",
    "TranslateY",
    "ShearY",
    "Rotate",
    "Equalize",
    "Contrast",
    "Color",
    "Solarize",
    "Brightness",
)
LEVELS = 9  # magnitude levels 1..9 of the package's 10-point tables
NUM_ENTRIES = len(RAND_AUGMENT_OPS) * LEVELS  # 135
OP_PROB = 0.5
AFFINE_FILL = (128, 128, 128)
CUTOUT_FILL = (125, 122, 113)

# Ops whose magnitude gets a random sign (the package's `random.choice([-1, 1])`).
SIGNED_OPS = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Sharpness", "Brightness"}
)
_ENHANCERS = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Sharpness": ImageEnhance.Sharpness,
    "Brightness": ImageEnhance.Brightness,
}
# PIL's inverse affine maps (output pixel -> input pixel) of the shear and translation ops.
_AFFINE_COEFFS = {
    "ShearX": lambda f: (1, f, 0, 0, 1, 0),
    "ShearY": lambda f: (1, 0, 0, f, 1, 0),
    "TranslateX": lambda px: (1, 0, px, 0, 1, 0),
    "TranslateY": lambda px: (1, 0, 0, 0, 1, px),
}
_NEAREST, _BILINEAR, _BICUBIC = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
)
INTERPOLATIONS = {"bilinear": _BILINEAR, "bicubic": _BICUBIC}
# The package's `SubPolicy` ranges; the rounded integer tables (`np.int`) are why it no longer
# imports cleanly with numpy >= 1.24.
_TABLES: dict[str, np.ndarray] = {
    "ShearX": np.linspace(0, 0.3, 10),
    "ShearY": np.linspace(0, 0.3, 10),
    "TranslateX": np.linspace(0, 150 / 331, 10),
    "TranslateY": np.linspace(0, 150 / 331, 10),
    "Rotate": np.linspace(0, 30, 10),
    "Color": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10), 0).astype(np.int64),
    "Solarize": np.linspace(256, 0, 10),
    "Contrast": np.linspace(0.0, 0.9, 10),
    "Sharpness": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10),
    "AutoContrast": np.zeros(10),
    "Equalize": np.zeros(10),
    "Invert": np.zeros(10),
    "Cutout": np.round(np.linspace(0, 20, 10), 0).astype(np.int64),
}


class RandAugmentStep(NamedTuple):
    """One op that `rand_augment` applies, with all its random parameters already drawn.

    `sign` is +1/-1 for `SIGNED_OPS` (1 otherwise); `center` is the (x, y) pixel of a Cutout
    square (None otherwise).
    """

    op: str
    level: int
    sign: int = 1
    center: tuple[int, int] | None = None


def rand_augment_magnitude(op: str, level: int) -> float | int:
    """The package's magnitude of `op` at `level` (1..9): e.g. shear 0.3*level/9, rotation
    30*level/9 degrees, enhancement offset 0.9*level/9, posterize bits, Cutout side in px."""
    if op not in _TABLES:
        raise ValueError(f"unknown RandAugment op {op!r}; expected one of {RAND_AUGMENT_OPS}")
    if not 1 <= level <= LEVELS:
        raise ValueError(f"RandAugment level {level} for {op}: expected an integer in 1..{LEVELS}")
    value = _TABLES[op][level]
    return int(value) if op in ("Posterize", "Cutout") else float(value)


def rand_augment_plan(rng: np.random.Generator, size: tuple[int, int]) -> list[RandAugmentStep]:
    """Draw one image's RandAugment: the (op, level) pair, the two p=0.5 coins, and the
    parameters of the ops that fire. `size` is the image's PIL (width, height)."""
    pair = int(rng.integers(NUM_ENTRIES * NUM_ENTRIES))
    entries = divmod(pair, NUM_ENTRIES)
    fires = rng.random(2) < OP_PROB
    steps = []
    for entry, fire in zip(entries, fires, strict=True):
        if not fire:
            continue
        op, level = RAND_AUGMENT_OPS[entry // LEVELS], entry % LEVELS + 1
        sign, center = 1, None
        if op in SIGNED_OPS:
            sign = 1 if rng.integers(2) else -1
        elif op == "Cutout":
            center = (int(rng.integers(size[0])), int(rng.integers(size[1])))
        steps.append(RandAugmentStep(op, level, sign, center))
    return steps


def pil_op(
    img: Image.Image,
    op: str,
    arg: float | int | None = None,
    *,
    resample: Image.Resampling | None = None,
    fill: tuple[int, int, int] | None = None,
) -> Image.Image:
    """One PIL image op with its argument already computed: the single implementation of
    each op that both RandAugments (`apply_rand_augment_op`, `apply_timm_op`) call.

    ShearX/ShearY: shear factor, about the origin (top-left corner); TranslateX/TranslateY:
    pixels; Rotate: degrees counter-clockwise about the centre; these take `resample` and
    `fill`. Posterize: bits kept (8 or more: unchanged, as PIL's posterize(8) is);
    Solarize: threshold; SolarizeAdd: `arg` added to values below 128 (clipped at 255);
    Color/Contrast/Brightness/Sharpness: the ImageEnhance factor; AutoContrast, Equalize,
    Invert: no argument.
    """
    if op in _AFFINE_COEFFS or op == "Rotate":
        if resample is None or fill is None:
            raise ValueError(f"{op} needs resample and fill")
        if op == "Rotate":
            return img.rotate(arg, resample=resample, fillcolor=fill)
        coeffs = _AFFINE_COEFFS[op](arg)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=fill)
    if op in _ENHANCERS:
        return _ENHANCERS[op](img).enhance(arg)
    if op == "Posterize":
        return img if arg >= 8 else ImageOps.posterize(img, arg)
    if op == "Solarize":
        return ImageOps.solarize(img, arg)
    if op == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    raise ValueError(f"unknown image op {op!r}")


def apply_rand_augment_op(img: Image.Image, step: RandAugmentStep) -> Image.Image:
    """Apply one RandAugment op with fixed parameters (no randomness), as the package does."""
    op = step.op
    mag = rand_augment_magnitude(op, step.level)
    if op in _ENHANCERS:
        return pil_op(img, op, 1 + step.sign * mag)
    if op in ("ShearX", "ShearY"):
        return pil_op(img, op, step.sign * mag, resample=_BICUBIC, fill=AFFINE_FILL)
    if op in ("TranslateX", "TranslateY"):
        pixels = step.sign * mag * img.size[0 if op == "TranslateX" else 1]
        return pil_op(img, op, pixels, resample=_NEAREST, fill=AFFINE_FILL)
    if op == "Rotate":
        return pil_op(img, op, mag, resample=_NEAREST, fill=AFFINE_FILL)
    if op == "Cutout":
        if step.center is None:
            raise ValueError("RandAugment Cutout step needs a center (x, y)")
        w, h = img.size
        (cx, cy), half = step.center, mag // 2
        x0, x1 = max(0, cx - half), min(w, cx + half)
        y0, y1 = max(0, cy - half), min(h, cy + half)
        img = img.copy()
        # PIL's rectangle includes its end points; the package's square is half-open.
        ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], fill=CUTOUT_FILL)
        return img
    return pil_op(img, op, mag)  # Posterize, Solarize, AutoContrast, Equalize, Invert


def rand_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """RandAugment as in `randaugment==1.0.2`: one uniformly drawn ordered pair of
    (op, level 1..9) entries out of 135, each applied with probability 0.5."""
    if img.mode != "RGB":
        raise ValueError(f"rand_augment expects an RGB image, got mode {img.mode!r}")
    for step in rand_augment_plan(rng, img.size):
        img = apply_rand_augment_op(img, step)
    return img


def cutout(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """CutoutPIL as in SALGL/ASL: one square of side int(factor*S + 0.5), centred at a uniform
    random pixel, clipped to the image, filled with one random RGB colour (end points included,
    as PIL's rectangle draws them, so an unclipped square paints 2*(side//2) + 1 pixels a side).

    The original reads `h, w = img.size`, i.e. swaps width and height; on the square images of
    the training chain (resized to S x S first) that makes no difference, and here the axes are
    the right way round.
    """
    w, h = img.size
    side_h, side_w = int(factor * h + 0.5), int(factor * w + 0.5)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = np.clip([cy - side_h // 2, cy + side_h // 2], 0, h)
    x1, x2 = np.clip([cx - side_w // 2, cx + side_w // 2], 0, w)
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    img = img.copy()
    ImageDraw.Draw(img).rectangle([int(x1), int(y1), int(x2), int(y2)], fill=color)
    return img


def multiscale_crop_box(
    width: int,
    height: int,
    output_size: int,
    scales: tuple[float, ...],
    max_distort: int,
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """The (left, top, crop_w, crop_h) that ML-GCN's `MultiScaleCrop` (from TSN; fix_crop and
    more_fix_crop on) picks in a `width` x `height` image.

    Candidate sides are int(min(width, height) * scale), snapped to `output_size` when within
    2 pixels of it; a (w, h) pair of candidates i, j is allowed when |i - j| <= max_distort,
    and one pair is drawn uniformly. The position is drawn uniformly from 13 fixed offsets on a
    4 x 4 grid of steps ((image - crop) // 4): the corners, the centre, the edge middles and
    the four quarter points (duplicates kept, as in the original list).
    """
    base = min(width, height)
    sides = [int(base * s) for s in scales]
    snap = [output_size if abs(x - output_size) < 3 else x for x in sides]
    pairs = [
        (w, h) for i, h in enumerate(snap) for j, w in enumerate(snap) if abs(i - j) <= max_distort
    ]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    grid = (
        (0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2),
        (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3),
    )  # fmt: skip
    gx, gy = grid[int(rng.integers(len(grid)))]
    return gx * ws, gy * hs, crop_w, crop_h


def multiscale_crop(
    img: Image.Image,
    output_size: int,
    scales: tuple[float, ...],
    max_distort: int,
    rng: np.random.Generator,
    resample: Image.Resampling = _BILINEAR,
) -> Image.Image:
    """ML-GCN's `MultiScaleCrop(output_size, scales, max_distort)`: the `multiscale_crop_box`
    crop of the original image, resized to output_size x output_size (ML-GCN: bilinear)."""
    x, y, w, h = multiscale_crop_box(*img.size, output_size, scales, max_distort, rng)
    return img.crop((x, y, x + w, y + h)).resize((output_size, output_size), resample)


def random_side_crop(
    img: Image.Image,
    output_size: int,
    resize_to: int,
    sides: tuple[int, ...],
    rng: np.random.Generator,
    resample: Image.Resampling = _BILINEAR,
) -> Image.Image:
    """SSGRL's train crop: resize to resize_to x resize_to, `RandomCrop` a square of a side
    drawn uniformly from `sides` at a uniform position (end points included, as torchvision's
    `randint(0, S - side)`), then resize to output_size (both resizes SSGRL: bilinear)."""
    side = int(sides[int(rng.integers(len(sides)))])
    if not 0 < side <= resize_to:
        raise ValueError(f"crop side {side} does not fit the {resize_to} px resize")
    img = img.resize((resize_to, resize_to), resample)
    top = int(rng.integers(resize_to - side + 1))
    left = int(rng.integers(resize_to - side + 1))
    img = img.crop((left, top, left + side, top + side))
    return img.resize((output_size, output_size), resample)


def resize_shorter_side(
    img: Image.Image, size: int, resample: Image.Resampling = _BILINEAR
) -> Image.Image:
    """torchvision's `Resize(size)` with an int: the shorter side becomes `size`, the longer
    int(size * long / short) (truncated), aspect kept; an image already that size is returned
    as it is."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if new == (w, h) else img.resize(new, resample)


def center_crop(
    img: Image.Image,
    output_size: int,
    resize_to: int,
    *,
    shorter_side: bool = False,
    resample: Image.Resampling = _BILINEAR,
) -> Image.Image:
    """The test-time resize, then torchvision's `CenterCrop(output_size)` (offsets rounded:
    int(round((S - size) / 2)) on each axis).

    SSGRL (default): resize to resize_to x resize_to (bilinear). `shorter_side`: timm's eval
    transform, `Resize(resize_to)` (shorter side to resize_to, aspect kept; timm's
    resize_to = floor(output_size / crop_pct), 256 for 224 at crop_pct 0.875), e.g. bicubic.
    """
    if resize_to < output_size:
        raise ValueError(f"resize to {resize_to} px is smaller than the {output_size} px crop")
    if shorter_side:
        img = resize_shorter_side(img, resize_to, resample)
    else:
        img = img.resize((resize_to, resize_to), resample)
    w, h = img.size
    top = int(round((h - output_size) / 2.0))
    left = int(round((w - output_size) / 2.0))
    return img.crop((left, top, left + output_size, top + output_size))


# ---------------------------------------------------------------------------------------
# The timm training transform (timm 0.6.12 `create_transform(is_training=True)`, SigRL:
# docs/sigrl.md §3.3): `RandomResizedCropAndInterpolation`, flip, `rand_augment_transform`.


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """The (left, top, crop_w, crop_h) of torchvision's / timm's `RandomResizedCrop.get_params`.

    Up to 10 attempts: area = uniform(scale) * width * height, aspect = exp(uniform(log
    ratio)), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first that
    fits (0 < w <= width, 0 < h <= height) is placed uniformly (top, then left, end points
    included). Otherwise the fallback: the whole image, narrowed to the nearer end of the ratio
    range when its own aspect lies outside it, centred (offsets floored).

    Draw order (one `uniform` each for the area and the log-ratio per attempt, then two
    `integers`) follows timm's; the values come from `rng`, not Python's `random`. timm's own
    check lacks torchvision's `0 <`, which only matters when a side rounds to 0 px.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(height - h + 1))
            left = int(rng.integers(width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    img: Image.Image,
    output_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    resample: Image.Resampling = _BICUBIC,
) -> Image.Image:
    """`RandomResizedCrop(output_size, scale, ratio, interpolation)`: the
    `random_resized_crop_box` crop, resized to output_size x output_size (torchvision's
    `resized_crop` on a PIL image: crop, then PIL resize)."""
    x, y, w, h = random_resized_crop_box(*img.size, scale, ratio, rng)
    return img.crop((x, y, x + w, y + h)).resize((output_size, output_size), resample)


TIMM_LEVEL_DENOM = 10.0  # timm's `_LEVEL_DENOM`: magnitude M maps to level M / 10
TIMM_TRANSLATE_PCT = 0.45  # timm's `translate_pct` default (TranslateXRel / TranslateYRel)
# timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS`, in timm's order (the op index
# decodes through it).
TIMM_RAND_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
TIMM_RAND_INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
# Ops whose level function calls timm's `_randomly_negate` (one fair coin per application).
TIMM_SIGNED_OPS = frozenset(
    {
        "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
        "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    }
)  # fmt: skip
TIMM_RANDAUGMENT_FORM = (
    "'rand' then '-'-separated sections m<int> (magnitude, default 10), n<int> (ops per "
    "image, default 2), mstd<float> (magnitude noise std; > 100: uniform), mmax<int> "
    "(magnitude clip, default 10), inc<0|1> (increasing ops), p<float> (op probability, "
    "default 0.5), e.g. 'rand-m9-mstd0.5-inc1'"
)


class TimmRandAugmentConfig(NamedTuple):
    """A parsed timm RandAugment config string (`parse_timm_randaugment`)."""

    magnitude: int = 10
    num_layers: int = 2
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: int = 0  # 0: timm's default upper bound, _LEVEL_DENOM = 10
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return TIMM_RAND_INCREASING_OPS if self.increasing else TIMM_RAND_OPS


def parse_timm_randaugment(config_str: str) -> TimmRandAugmentConfig:
    """Parse a timm `rand_augment_transform` config string the way timm 0.6.12 does.

    Sections split on '-' after the leading 'rand'; each is a key and the value from its first
    digit on. Keys: m, n, mstd (> 100 means uniform sampling), mmax, inc, and p (a later timm
    key: the per-op probability). timm reads `inc` as `bool(val)` of the string, so 'inc0'
    selects the increasing ops too; leave `inc` out for the plain set. Raises ValueError on
    anything else: another key, a section without a value (timm skips those silently), the
    weighted choice 'w' (not implemented here), or a malformed value.
    """
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"expected {TIMM_RANDAUGMENT_FORM}")
    cfg = TimmRandAugmentConfig()
    for section in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ValueError(f"section {section!r}: expected {TIMM_RANDAUGMENT_FORM}")
        key, val = match.groups()
        try:
            if key == "m":
                cfg = cfg._replace(magnitude=int(val))
            elif key == "n":
                cfg = cfg._replace(num_layers=int(val))
            elif key == "mstd":
                mstd = float(val)
                cfg = cfg._replace(magnitude_std=math.inf if mstd > 100 else mstd)
            elif key == "mmax":
                cfg = cfg._replace(magnitude_max=int(val))
            elif key == "inc" and val in ("0", "1"):
                cfg = cfg._replace(increasing=True)  # timm: bool("0") is True
            elif key == "p" and 0.0 <= float(val) <= 1.0:
                cfg = cfg._replace(prob=float(val))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"section {section!r}: expected {TIMM_RANDAUGMENT_FORM}") from None
    return cfg


def timm_fill(mean: tuple[float, ...]) -> tuple[int, ...]:
    """timm's `img_mean` hparam: the fill of the geometric ops, the normalisation mean x 255
    rounded (ImageNet: (124, 116, 104))."""
    return tuple(min(255, round(255 * x)) for x in mean)


def timm_op_arg(op: str, magnitude: float, negate: bool = False) -> float | int | None:
    """timm's level function (`LEVEL_TO_ARG`) of `op` at `magnitude` (already noised and
    clipped); `negate` is `_randomly_negate`'s coin for `TIMM_SIGNED_OPS`. The same float
    expressions as timm: level = magnitude / 10, then e.g. Rotate level*30 degrees, Shear
    level*0.3, TranslateXRel level*0.45 of the width, PosterizeIncreasing 4 - int(level*4)
    bits, SolarizeIncreasing 256 - int(level*256), SolarizeAdd int(level*110), an enhancement
    level*1.8 + 0.1 or (increasing) max(0.1, 1 +/- level*0.9). None for the ops without one."""
    level = magnitude / TIMM_LEVEL_DENOM
    sign = -1 if negate else 1
    base = op.removesuffix("Increasing")
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return sign * (level * 30.0)
    if op in ("ShearX", "ShearY"):
        return sign * (level * 0.3)
    if op in ("TranslateXRel", "TranslateYRel"):
        return sign * (level * TIMM_TRANSLATE_PCT)
    if op == "Posterize":
        return int(level * 4)
    if op == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if op == "Solarize":
        return int(level * 256)
    if op == "SolarizeIncreasing":
        return 256 - int(level * 256)
    if op == "SolarizeAdd":
        return int(level * 110)
    if base in _ENHANCERS and op != base:
        return max(0.1, 1.0 + sign * (level * 0.9))
    if op in _ENHANCERS:
        return level * 1.8 + 0.1
    raise ValueError(f"unknown timm RandAugment op {op!r}; expected one of {TIMM_RAND_OPS}")


class TimmStep(NamedTuple):
    """One timm op that fires, with its drawn magnitude (noised, clipped) and sign coin."""

    op: str
    magnitude: float
    negate: bool = False


def timm_rand_augment_plan(cfg: TimmRandAugmentConfig, rng: np.random.Generator) -> list[TimmStep]:
    """Draw one image's timm RandAugment (`RandAugment.__call__`, `AugmentOp.__call__`):
    `num_layers` op indices uniformly WITH replacement, then per chosen op in order: its
    probability coin (skipped when u > prob, as timm's `random.random() > prob`), the
    magnitude (gauss(M, mstd), or uniform(0, M) when mstd is inf; clipped to [0, mmax or
    10]) and, for `TIMM_SIGNED_OPS`, the sign coin (negated when u > 0.5)."""
    ops = cfg.ops
    steps = []
    for index in rng.integers(len(ops), size=cfg.num_layers):
        op = ops[int(index)]
        if cfg.prob < 1.0 and rng.random() > cfg.prob:
            continue
        magnitude = float(cfg.magnitude)
        if cfg.magnitude_std == math.inf:
            magnitude = float(rng.uniform(0.0, magnitude))
        elif cfg.magnitude_std > 0:
            magnitude = float(rng.normal(magnitude, cfg.magnitude_std))
        magnitude = max(0.0, min(magnitude, cfg.magnitude_max or TIMM_LEVEL_DENOM))
        negate = op in TIMM_SIGNED_OPS and bool(rng.random() > 0.5)
        steps.append(TimmStep(op, magnitude, negate))
    return steps


def apply_timm_op(
    img: Image.Image,
    step: TimmStep,
    resample: Image.Resampling = _BICUBIC,
    fill: tuple[int, ...] = AFFINE_FILL,
) -> Image.Image:
    """Apply one timm op with fixed parameters: `timm_op_arg`, then the `pil_op` of the op's
    PIL base (TranslateXRel: pct * width pixels; the Increasing variants: their base op)."""
    arg = timm_op_arg(step.op, step.magnitude, step.negate)
    op = step.op.removesuffix("Increasing")
    if op in ("TranslateXRel", "TranslateYRel"):
        arg = arg * img.size[0 if op == "TranslateXRel" else 1]
        op = op.removesuffix("Rel")
    return pil_op(img, op, arg, resample=resample, fill=tuple(fill))


def timm_rand_augment(
    img: Image.Image,
    cfg: TimmRandAugmentConfig,
    rng: np.random.Generator,
    resample: Image.Resampling = _BICUBIC,
    fill: tuple[int, ...] = AFFINE_FILL,
) -> Image.Image:
    """timm's `rand_augment_transform(config_str, hparams)` on one RGB image, with hparams
    `interpolation` = `resample` and `img_mean` = `fill` (SigRL: bicubic, `timm_fill` of the
    ImageNet mean)."""
    if img.mode != "RGB":
        raise ValueError(f"timm_rand_augment expects an RGB image, got mode {img.mode!r}")
    for step in timm_rand_augment_plan(cfg, rng):
        img = apply_timm_op(img, step, resample, fill)
    return img


# ---------------------------------------------------------------------------------------
# Training chains. `config.data.augment` names one row of `CHAINS`; `pipeline.TrainTransform`
# runs it: the geometric step to the output size, flip, cutout, then a RandAugment, each
# drawing from the example's generator in that order. Each step is a frozen dataclass that
# checks its values when built, and a Chain holds one geometric step and at most one
# RandAugment, so alternatives cannot be combined.


@dataclasses.dataclass(frozen=True)
class Resize:
    """A square resize to the output size (SALGL, Query2Label, the single-positive methods)."""

    def apply(
        self, img: Image.Image, size: int, rng: np.random.Generator, resample: Image.Resampling
    ) -> Image.Image:
        """The image resized to size x size; draws nothing from `rng`."""
        return img.resize((size, size), resample)


@dataclasses.dataclass(frozen=True)
class MultiScaleCrop:
    """ML-GCN's `MultiScaleCrop` (`multiscale_crop`): crop sides `scales` of the shorter side,
    width and height at most `max_distort` scale indices apart."""

    scales: tuple[float, ...]
    max_distort: int = 2

    def __post_init__(self) -> None:
        # Tuples: JSON gives lists back, and a frozen step must hash.
        object.__setattr__(self, "scales", tuple(float(x) for x in self.scales))
        if not self.scales or not all(0 < s <= 1 for s in self.scales):
            raise ConfigError(
                f"MultiScaleCrop.scales={self.scales}: expected shares of the shorter side in "
                "(0, 1], e.g. ML-GCN's (1.0, 0.875, 0.75, 0.66, 0.5)"
            )
        if self.max_distort < 0:
            raise ConfigError(
                f"MultiScaleCrop.max_distort={self.max_distort}: expected a scale-index gap >= 0 "
                "(ML-GCN: 2)"
            )

    def apply(
        self, img: Image.Image, size: int, rng: np.random.Generator, resample: Image.Resampling
    ) -> Image.Image:
        """`multiscale_crop` of the image to size x size."""
        return multiscale_crop(img, size, self.scales, self.max_distort, rng, resample)


@dataclasses.dataclass(frozen=True)
class SideCrop:
    """SSGRL's crop (`random_side_crop`): resize to `resize` x `resize`, a random square of a
    side drawn from `sides`, resized to the output size."""

    resize: int
    sides: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sides", tuple(int(x) for x in self.sides))
        if not self.sides or min(self.sides) <= 0:
            raise ConfigError(
                f"SideCrop.sides={self.sides}: expected one or more crop sides (SSGRL: "
                "(640, 576, 512, 384, 320) from resize=640)"
            )
        if max(self.sides) > self.resize:
            raise ConfigError(f"SideCrop.sides={self.sides}: larger than resize={self.resize}")

    def apply(
        self, img: Image.Image, size: int, rng: np.random.Generator, resample: Image.Resampling
    ) -> Image.Image:
        """`random_side_crop` of the image to size x size."""
        return random_side_crop(img, size, self.resize, self.sides, rng, resample)


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's / timm's `RandomResizedCrop` (`random_resized_crop`): the crop's area as a
    share of the image drawn from `scale`, its aspect ratio (log-uniformly) from `ratio`."""

    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        for name in ("scale", "ratio"):
            value = tuple(float(x) for x in getattr(self, name))
            object.__setattr__(self, name, value)
            if not (len(value) == 2 and 0 < value[0] <= value[1]):
                raise ConfigError(
                    f"RandomResizedCrop.{name}={value}: expected (min, max) with "
                    "0 < min <= max, e.g. (0.08, 1.0) and (3/4, 4/3)"
                )

    def apply(
        self, img: Image.Image, size: int, rng: np.random.Generator, resample: Image.Resampling
    ) -> Image.Image:
        """`random_resized_crop` of the image to size x size."""
        return random_resized_crop(img, size, self.scale, self.ratio, rng, resample)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """randaugment==1.0.2's `RandAugment()` (`rand_augment`; SALGL, Query2Label)."""

    def apply(
        self,
        img: Image.Image,
        rng: np.random.Generator,
        resample: Image.Resampling,
        fill: tuple[int, ...],
    ) -> Image.Image:
        """`rand_augment` of the image; its ops keep the package's own resampling and fill."""
        return rand_augment(img, rng)


@dataclasses.dataclass(frozen=True)
class TimmRandAugment:
    """timm's `rand_augment_transform(config)` (`timm_rand_augment`; SigRL:
    'rand-m9-mstd0.5-inc1'). Two strings that parse alike compare equal: they behave alike."""

    config: str = dataclasses.field(compare=False)
    parsed: TimmRandAugmentConfig = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "parsed", parse_timm_randaugment(self.config))
        except ValueError as e:
            raise ConfigError(f"TimmRandAugment.config='{self.config}': {e}") from None

    def apply(
        self,
        img: Image.Image,
        rng: np.random.Generator,
        resample: Image.Resampling,
        fill: tuple[int, ...],
    ) -> Image.Image:
        """`timm_rand_augment` of the image with the chain's resampling and `fill`."""
        return timm_rand_augment(img, self.parsed, rng, resample, fill)


Geometry = Resize | MultiScaleCrop | SideCrop | RandomResizedCrop
AnyRandAugment = RandAugment | TimmRandAugment


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chain:
    """One training chain: `geometry` (a resize or a crop to the output size), a horizontal
    flip with p=0.5 when `flip`, CutoutPIL of factor `cutout` (0 = off), one `randaugment`
    (None = off), and the `interpolation` of the resize/crop and of timm's geometric ops."""

    geometry: Geometry
    flip: bool
    cutout: float = 0.0
    randaugment: AnyRandAugment | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, Geometry):
            raise ConfigError(
                f"Chain.geometry={self.geometry!r}: expected Resize, MultiScaleCrop, SideCrop "
                "or RandomResizedCrop"
            )
        if not 0 <= self.cutout <= 1:
            raise ConfigError(
                f"Chain.cutout={self.cutout}: expected a share of the image side in [0, 1] "
                "(SALGL: 0.5; 0 = off)"
            )
        if self.randaugment is not None and not isinstance(self.randaugment, AnyRandAugment):
            raise ConfigError(
                f"Chain.randaugment={self.randaugment!r}: expected None, RandAugment() or "
                "TimmRandAugment(config)"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"Chain.interpolation='{self.interpolation}': expected one of "
                f"{', '.join(INTERPOLATIONS)}"
            )


# Every training chain, by the name `config.data.augment` gives.
CHAINS: dict[str, Chain] = {
    "resize": Chain(geometry=Resize(), flip=False),
    # The single-positive protocol, Scob, the demos and the baseline (base_config's default).
    "resize_flip": Chain(geometry=Resize(), flip=True),
    # ASL's training code, which SALGL follows (docs/salgl.md §3.4).
    "salgl": Chain(geometry=Resize(), flip=True, cutout=0.5, randaugment=RandAugment()),
    # The official Query2Label code: ASL's chain without the flip (docs/ssgrl_mlgcn.md §4.1).
    "q2l": Chain(geometry=Resize(), flip=False, cutout=0.5, randaugment=RandAugment()),
    # docs/ssgrl_mlgcn.md §1.7.
    "ssgrl": Chain(geometry=SideCrop(640, (640, 576, 512, 384, 320)), flip=False),
    # docs/ssgrl_mlgcn.md §3.1.
    "mlgcn": Chain(geometry=MultiScaleCrop((1.0, 0.875, 0.75, 0.66, 0.5), 2), flip=True),
    # SigRL's timm 0.6.12 `create_transform(is_training=True)` (docs/sigrl.md §3.3).
    "timm": Chain(
        geometry=RandomResizedCrop((0.08, 1.0), (3 / 4, 4 / 3)),
        flip=True,
        randaugment=TimmRandAugment("rand-m9-mstd0.5-inc1"),
        interpolation="bicubic",
    ),
}


def chain(name: str) -> Chain:
    """The row of `CHAINS` that `config.data.augment` names."""
    if not isinstance(name, str) or name not in CHAINS:
        raise ConfigError(
            f"config.data.augment='{name}': unknown; expected one of {', '.join(CHAINS)}"
        )
    return CHAINS[name]


# What `config.data.augment` held before it named a chain: switches, with their defaults then.
OLD_SWITCHES: dict[str, Any] = {
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


def _chain_of_switches(saved: Mapping[str, Any]) -> Chain | None:
    """The chain the old switch-reading TrainTransform ran for `saved`; None where it refused
    the switches (alternatives combined) or they are not switches it knew. Raises ConfigError
    for values a Chain rejects."""
    if set(saved) - set(OLD_SWITCHES):
        return None
    s = {**OLD_SWITCHES, **saved}
    geometries = []
    if s["multiscale_crop"]:
        geometries.append(MultiScaleCrop(s["multiscale_crop"], int(s["max_distort"])))
    if s["crop_resize"] or s["crop_sides"]:
        geometries.append(SideCrop(int(s["crop_resize"]), s["crop_sides"]))
    if s["random_resized_crop"]:
        ratio = s["random_resized_crop_ratio"]
        geometries.append(RandomResizedCrop(s["random_resized_crop"], ratio))
    randaugments = [RandAugment()] if s["randaugment"] else []
    if s["timm_randaugment"]:
        randaugments.append(TimmRandAugment(s["timm_randaugment"]))
    if len(geometries) > 1 or len(randaugments) > 1:
        return None
    return Chain(
        geometry=geometries[0] if geometries else Resize(),
        flip=bool(s["flip"]),
        cutout=float(s["cutout"]),
        randaugment=randaugments[0] if randaugments else None,
        interpolation=s["interpolation"],
    )


def chain_name_of(saved: Mapping[str, Any]) -> str:
    """The name of the `CHAINS` row that behaves as the switch dict `config.data.augment` held
    in a config saved by an earlier version (e.g. a workdir's config.json; lists for tuples).
    Switches the dict lacks take their old defaults (`OLD_SWITCHES`), and switches the old
    chain ignored (max_distort without multiscale_crop, ...) do not count.
    Raises ConfigError naming the switches when no chain matches."""
    try:
        found = _chain_of_switches(saved)
    except ConfigError:
        found = None
    for name, row in CHAINS.items():
        if row == found:
            return name
    raise ConfigError(
        f"config.data.augment={dict(saved)} (switches saved by an earlier version): no chain in "
        f"mlgraph.data.augment.CHAINS behaves so; the chains: {', '.join(CHAINS)}"
    )

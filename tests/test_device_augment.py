"""On-device photometric augmentation (mlgraph.models.device_augment) against independent
references: Python's colorsys for the hue shift, scipy for the reflect-padded blur, the blend
formulas of torchvision's ColorJitter, and the gate frequencies and blue-std typo of Scob's
strong augmentation (docs/scob_spml.md §3.5)."""

from __future__ import annotations

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mlgraph.models import device_augment as da

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def image():
    return np.random.default_rng(0).random((6, 5, 3)).astype(np.float32)


def test_brightness_contrast_saturation_are_torchvision_blends(image):
    gray = image @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(da.adjust_brightness(image, 1.7), np.clip(1.7 * image, 0, 1))
    expected = np.clip(0.4 * image + 0.6 * gray.mean(), 0, 1)
    np.testing.assert_allclose(da.adjust_contrast(image, 0.4), expected, rtol=1e-6)
    expected = np.clip(1.5 * image - 0.5 * gray[..., None], 0, 1)
    np.testing.assert_allclose(da.adjust_saturation(image, 1.5), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [0.17, -0.2, 0.5])
def test_hue_shift_matches_colorsys(image, shift):
    expected = np.empty_like(image)
    for idx in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*image[idx])
        expected[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(da.adjust_hue(image, shift), expected, atol=2e-6)
    grey = np.full((2, 2, 3), 0.3, np.float32)  # no hue: unchanged
    np.testing.assert_allclose(da.adjust_hue(grey, shift), grey, atol=1e-7)


def test_gaussian_blur_is_separable_and_reflect_padded(image):
    sigma = 1.3
    x = np.linspace(-1, 1, 3)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    expected = np.stack(
        [ndimage.convolve(image[..., c], np.outer(k, k), mode="mirror") for c in range(3)], -1
    )
    np.testing.assert_allclose(da.gaussian_blur(image, 3, sigma), expected, rtol=1e-5)


def test_color_jitter_applies_each_op_once_in_a_random_order(image):
    outs = [np.asarray(da.color_jitter(image, jax.random.key(i))) for i in range(8)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert len({o.tobytes() for o in outs}) == 8


def test_strong_augment_gates_and_the_blue_typo():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(400, 8, 8, 3)).astype(np.float32)
    undo = (0.229, 0.224, 0.255)
    out = np.asarray(da.strong_augment(jnp.asarray(images), jax.random.key(0), MEAN, STD, undo))
    mean, std, back = np.array(MEAN), np.array(STD), np.array(undo)
    # An image no stage touched: undone with the typo'd std, normalised again, so blue is
    # scaled by 0.255 / 0.225 and shifted, red and green unchanged.
    identity = (images * back + mean * back / std - mean) / std
    untouched = np.all(np.isclose(out, identity, atol=1e-5), axis=(1, 2, 3))
    # P(no jitter) P(no grayscale) P(no blur) = 0.7 (1 - 0.2 x 0.1) 0.8 = 0.549.
    assert 0.47 < untouched.mean() < 0.63
    np.testing.assert_allclose(identity[..., :2], images[..., :2], atol=1e-5)
    np.testing.assert_allclose(
        identity[..., 2],
        (images[..., 2] * 0.255 + 0.406 * 0.255 / 0.225 - 0.406) / 0.225,
        atol=1e-5,
    )
    pixels = out * std + mean  # grayscale images have three equal channels before normalising
    gray = np.all(np.isclose(pixels[..., 0], pixels[..., 2], atol=1e-5), axis=(1, 2))
    assert 2 <= gray.sum() <= 20  # about 2 % of 400 images (gated twice)

"""The input bench's COCO-sized JPEGs, the pipeline's JPEG decoder (simplejpeg, PIL's pixels,
PIL for other formats) and the decoder bench's report, including missing libraries."""

import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from train_helpers import tiny_config

from mlgraph import bench_input, recipes
from mlgraph.data import augment, datasets, images, pipeline


@pytest.fixture(scope="module")
def coco_files():
    return bench_input.coco_sized_jpegs(6)


def jpeg(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", **{"quality": 90, **kwargs})
    return out.getvalue()


def pil_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def pil_calls(monkeypatch):
    """Records each call of the PIL path of `images.decode_rgb`."""
    calls = []
    reference = images.decode_rgb_pil

    def spy(data, name="image"):
        calls.append(name)
        return reference(data, name)

    monkeypatch.setattr(images, "decode_rgb_pil", spy)
    return calls


def test_coco_sized_jpegs_are_640x480_rgb_jpegs_and_reproducible(coco_files):
    assert len(coco_files) == 6
    for data in coco_files:
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (640, 480))
    assert bench_input.coco_sized_jpegs(2) == coco_files[:2]
    assert len(set(coco_files)) == 6


def test_decode_rgb_is_simplejpeg_with_pils_pixels_on_coco_files(coco_files, pil_calls):
    for data in coco_files:
        out = images.decode_rgb(data, "x")
        assert out.dtype == np.uint8 and out.shape == (480, 640, 3)
        np.testing.assert_array_equal(out, pil_pixels(data))
    assert pil_calls == []  # all went through simplejpeg


@pytest.mark.parametrize(
    "kind", ["progressive", "4:4:4", "4:2:2", "odd size", "quality 100", "adobe rgb"]
)
def test_decode_rgb_other_ycbcr_and_rgb_jpegs_match_pil(kind, coco_files, pil_calls):
    img = Image.open(io.BytesIO(coco_files[0])).convert("RGB")
    data = {
        "progressive": lambda: jpeg(img, progressive=True),
        "4:4:4": lambda: jpeg(img, subsampling=0),
        "4:2:2": lambda: jpeg(img, subsampling=1),
        "odd size": lambda: jpeg(img.resize((333, 251))),
        "quality 100": lambda: jpeg(img, quality=100),
        "adobe rgb": lambda: jpeg(img, keep_rgb=True),  # stored as RGB, not YCbCr
    }[kind]()
    np.testing.assert_array_equal(images.decode_rgb(data), pil_pixels(data))
    assert pil_calls == []


@pytest.mark.parametrize("kind", ["grey jpeg", "cmyk jpeg", "rgba png", "grey png", "palette gif"])
def test_decode_rgb_falls_back_to_pil_by_format(kind, coco_files, pil_calls):
    img = Image.open(io.BytesIO(coco_files[1])).convert("RGB").resize((160, 120))
    out = io.BytesIO()
    if kind == "grey jpeg":
        img.convert("L").save(out, format="JPEG", quality=90)
    elif kind == "cmyk jpeg":  # simplejpeg's CMYK -> RGB differs from PIL's by 1
        img.convert("CMYK").save(out, format="JPEG", quality=90)
    elif kind == "rgba png":
        img.convert("RGBA").save(out, format="PNG")
    elif kind == "grey png":
        img.convert("L").save(out, format="PNG")
    else:
        img.convert("P").save(out, format="GIF")
    data = out.getvalue()
    decoded = images.decode_rgb(data, "image 7")
    assert decoded.shape == (120, 160, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pil_pixels(data))
    assert pil_calls == ["image 7"]


def test_decode_rgb_corrupt_images_raise_the_pil_error_naming_the_image(coco_files):
    truncated = coco_files[0][: len(coco_files[0]) // 2]
    garbage = b"\xff\xd8\xff" + b"not a jpeg" * 20
    for data, why in [(truncated, "truncated"), (garbage, "cannot decode image")]:
        with pytest.raises(images.BadImage, match=f"^image 391895: .*{why}") as fast:
            images.decode_rgb(data, "image 391895")
        with pytest.raises(images.BadImage) as reference:
            images.decode_rgb_pil(data, "image 391895")
        assert str(fast.value) == str(reference.value)
    with pytest.raises(images.BadImage, match="^image 1: cannot decode image \\(not a known"):
        images.decode_rgb(b"plain text", "image 1")


def test_decode_rgb_damaged_but_decodable_jpegs_give_pils_pixels(coco_files, pil_calls):
    data = coco_files[2]
    # A stray restart marker in the entropy-coded data: libjpeg warns and goes on, PIL decodes
    # it, so simplejpeg (strict) hands it to PIL instead of raising.
    damaged = data[:4000] + b"\xff\xd0" + data[4000:]
    np.testing.assert_array_equal(images.decode_rgb(damaged, "d"), pil_pixels(damaged))
    assert pil_calls == ["d"]
    # Flipped coefficient bits: no warning, simplejpeg decodes the same wrong pixels as PIL.
    garbled = data[:4000] + b"\x00\x00" + data[4000:]
    np.testing.assert_array_equal(images.decode_rgb(garbled, "g"), pil_pixels(garbled))
    assert pil_calls == ["d"]


def salgl_config(image_size: int = 64):
    c = recipes.salgl(dataset="coco2014", image_size=image_size, backbone="resnet50", num_scenes=6)
    return c


def test_pipeline_decodes_encoded_images_to_the_same_batches(coco_files):
    """Bytes in (a source opened with SkipDecoding) give exactly the outputs of PIL's arrays."""
    c = salgl_config()
    chain = augment.chain(c.data.augment)
    train = pipeline.TrainTransform(64, 3, chain, c.data.mean, c.data.std)
    evaluate = pipeline.EvalTransform(64, 3, c.data.mean, c.data.std)
    labels = np.array([1, 0, 1], np.uint8)
    for i, data in enumerate(coco_files[:3]):
        encoded = {"image": data, "labels": labels, "image_id": i}
        decoded = {"image": pil_pixels(data), "labels": labels, "image_id": i}
        a = train.random_map(encoded, np.random.default_rng(i))
        b = train.random_map(decoded, np.random.default_rng(i))
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(
            evaluate.map(encoded)["image"], evaluate.map(decoded)["image"]
        )
    bad = {"image": coco_files[0][:5000], "labels": labels, "image_id": b"COCO_1"}
    with pytest.raises(images.BadImage, match="^image COCO_1: cannot decode image"):
        train.random_map(bad, np.random.default_rng(0))


def test_train_dataset_same_batches_from_a_skip_decoding_source(tiny_coco_dir, tmp_path):
    config = tiny_config(tmp_path)
    config.batch_size = 4
    builder = datasets.make_builder("coco2014", tiny_coco_dir)
    decoded = builder.as_data_source(split="train")
    encoded = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    assert isinstance(encoded[0]["image"], bytes)
    a = iter(pipeline.train_dataset(decoded, config, 4, process=(0, 1)))
    b = iter(pipeline.train_dataset(encoded, config, 4, process=(0, 1)))
    for _ in range(2):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["labels"], y["labels"])


def test_bench_decoders_reports_rates_diffs_and_stages():
    result = bench_input.bench_decoders(salgl_config(), num_images=3, repeats=1)
    assert set(result["decode"]) | set(result["missing"]) == set(bench_input.DECODERS)
    assert {"pil", "simplejpeg", "mlgraph"} <= set(result["decode"])
    for row in result["decode"].values():
        assert row["images_per_s"] > 0 and row["max_abs_diff"] == 0
    assert set(result["chain"]) == {"pil", "mlgraph"}
    assert all(rate > 0 for rate in result["chain"].values())
    assert list(result["stages_ms"]) == ["decode", "resize+normalise", "flip", "cutout"] + [
        "randaugment"
    ]
    assert result["pipeline_decoder"] == "simplejpeg" and result["image_size"] == 64
    table = bench_input.format_table(result)
    assert "simplejpeg" in table and "target 150 img/s per worker" in table


def test_bench_decoders_marks_missing_libraries(monkeypatch):
    # A None entry in sys.modules makes `import NAME` raise ImportError.
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    result = bench_input.bench_decoders(salgl_config(), num_images=2, repeats=1)
    assert result["missing"]["simplejpeg"] == "not installed (pip install simplejpeg)"
    assert result["missing"]["opencv"].startswith("not installed")
    assert "simplejpeg" not in result["decode"] and "opencv" not in result["decode"]
    assert result["decode"]["pil"]["images_per_s"] > 0
    table = bench_input.format_table(result)
    assert "simplejpeg   not installed (pip install simplejpeg)" in table


def test_pillow_simd_is_missing_unless_it_is_the_installed_pil(monkeypatch):
    monkeypatch.setattr(bench_input, "pil_distribution", lambda: "Pillow 13.0.0")
    found, missing = bench_input.available_decoders()
    assert "pillow-simd" not in found and "source distribution" in missing["pillow-simd"]
    monkeypatch.setattr(bench_input, "pil_distribution", lambda: "pillow-simd 12.1.1.post0")
    found, missing = bench_input.available_decoders()
    assert "pillow-simd" in found and "pillow-simd" not in missing

"""Issue 32, image faults: huge images (one size policy in predict, the builders and viz),
images that are not 8-bit (every mode converted to RGB by its value range), and a predict run in
which no file could be read. Each fault is one line, and nothing already saved is lost."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import re
import struct
import zlib

import numpy as np
import pytest
from custom_fixture import write_custom
from image_fixture import write_image
from PIL import Image
from train_helpers import tiny_config

from mlgraph import predict, train
from mlgraph.data import datasets, images
from mlgraph.errors import DataError
from mlgraph.viz import __main__ as viz_cli
from mlgraph.viz import cam

LIMIT = 5000  # --max_image_pixels of the small-image tests: 120x100 is over it, 60x50 within


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def png_header_only(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
    """A PNG that declares width x height 8-bit gray pixels and holds none: a decompression
    bomb's header, which must be refused before any pixel is allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def big_pair(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(a 120x100 RGB JPEG, a 120x100 RGB PNG): over LIMIT; the JPEG fits it at 1/2 scale."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (100, 120, 3), np.uint8)
    Image.fromarray(pixels).save(folder / "big.jpg", quality=90)
    Image.fromarray(pixels).save(folder / "big.png")
    return folder / "big.jpg", folder / "big.png"


GRAY16 = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)


def gray16_png(path: pathlib.Path) -> tuple[pathlib.Path, np.ndarray]:
    """(a 16-bit grayscale PNG of values 0..65535, the RGB image it stands for)."""
    Image.fromarray(GRAY16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    gray = ((GRAY16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # round(v/257)
    return path, np.repeat(gray[:, :, None], 3, axis=2)


def too_big(path, width: int, height: int, limit: int) -> str:
    """The one line for an image over the limit that cannot be decoded reduced."""
    return (
        f"{path}: {width}x{height} pixels, over the limit of {limit} pixels; pass "
        f"--max_image_pixels={width * height} to decode it, or make the file smaller"
    )


def reduced(path, width: int, height: int, limit: int, scale: int) -> str:
    """The warning for a JPEG over the limit, decoded at 1/scale."""
    return (
        f"warning: {path}: {width}x{height} pixels, over the limit of {limit} pixels "
        f"(--max_image_pixels); decoded at 1/{scale} scale, "
        f"{-(-width // scale)}x{-(-height // scale)}"
    )


def digest(folder: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def workdir(tiny_coco_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults_images") / "w"
    train.run(tiny_config(tiny_coco_dir, total_steps=2), path)
    return path


def run_predict(workdir, inputs, out, *extra) -> int:
    args = ["--workdir", str(workdir), *map(str, inputs), "--output", str(out), *extra]
    return predict.main(args)


# ---------------------------------------------------------------------------------------------
# Item 1: one size policy
# ---------------------------------------------------------------------------------------------
def test_predict_over_the_size_limit_reduces_jpegs_and_skips_the_rest(
    workdir, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", "rgb")
    big_jpg, big_png = big_pair(folder)
    # PIL's own check, set below these images, must not be what decides (nor warn).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    saved = digest(workdir)
    out = tmp_path / "preds.jsonl"

    status = run_predict(workdir, [folder], out, f"--max_image_pixels={LIMIT}")

    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert printed.err.splitlines() == [
        reduced(big_jpg, 120, 100, LIMIT, 2),
        f"warning: {too_big(big_png, 120, 100, LIMIT)}; skipped",
    ]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in records] == [str(folder / "a.jpg"), str(big_jpg)]
    assert printed.out.splitlines()[-1] == f"wrote 2 predictions to {out}"
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's setting is the user's again
    assert digest(workdir) == saved  # checkpoints, metrics.jsonl, config.json untouched


def test_predict_the_issues_13500_pixel_jpeg_at_half_scale_and_refuses_a_bomb(
    workdir, tmp_path, capsys
):
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", "rgb")
    huge = folder / "huge.jpg"
    Image.new("L", (13500, 13500), 90).save(huge, quality=90)
    bomb = png_header_only(folder / "bomb.png", 13500, 13500)
    out = tmp_path / "preds.csv"

    status = run_predict(workdir, [folder], out)

    printed = capsys.readouterr()
    assert status == 0, printed.err
    limit = images.MAX_IMAGE_PIXELS
    assert printed.err.splitlines() == [
        f"warning: {too_big(bomb, 13500, 13500, limit)}; skipped",
        reduced(huge, 13500, 13500, limit, 2),
    ]
    rows = out.read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == [str(folder / "a.jpg"), str(huge)]
    assert printed.out.splitlines()[-1] == f"wrote 2 predictions to {out}"


def test_builders_store_reduced_jpegs_and_skip_other_images_over_the_limit(tmp_path, capsys):
    raw, _ = write_custom(
        tmp_path / "raw",
        {
            "train": ["images/a.jpg\tcat", "images/big.jpg\tdog", "images/big.png\tdog"],
            "test": ["images/a.jpg\tcat"],
        },
        {"images/a.jpg": "rgb"},
    )
    big_jpg, big_png = big_pair(raw / "images")

    builder = datasets.build("custom", raw, tmp_path / "built", max_image_pixels=LIMIT)

    skip = f"{raw / 'train.txt'}:3: {too_big(big_png, 120, 100, LIMIT)}"
    assert builder.info.metadata["skipped"]["train"] == [skip]
    source = builder.as_data_source(split="train")
    shapes = {source[i]["image_id"].decode(): source[i]["image"].shape for i in range(2)}
    assert shapes == {"images/a.jpg": (40, 56, 3), "images/big.jpg": (50, 60, 3)}
    # One whole line among TFDS's progress bars (their cursor moves taken out).
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)
    assert reduced(big_jpg, 120, 100, LIMIT, 2) in err.splitlines()


def test_viz_cam_reads_images_under_the_same_limit(tmp_path, capsys):
    big_jpg, big_png = big_pair(tmp_path)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    with pytest.raises(DataError) as e:
        cam.read_image(big_png, 32, mean, std, max_pixels=LIMIT)
    assert str(e.value) == too_big(big_png, 120, 100, LIMIT)

    mpo = tmp_path / "camera.jpg"  # a camera's MPO: a JPEG with a second frame
    with Image.open(big_jpg) as im:
        im.save(mpo, "MPO", save_all=True, append_images=[im.copy()])
    for path in (big_jpg, mpo):
        pixels, normalised = cam.read_image(path, 32, mean, std, max_pixels=LIMIT)
        assert pixels.shape == normalised.shape == (32, 32, 3)
    assert capsys.readouterr().err.splitlines() == [
        reduced(big_jpg, 120, 100, LIMIT, 2),
        reduced(mpo, 120, 100, LIMIT, 2),
    ]

    status = viz_cli.main(["heatmap", "--workdir", str(tmp_path), "--max_image_pixels=9"])
    assert status == 2
    assert capsys.readouterr().err == "error: --max_image_pixels: only for cam and attention\n"


def test_a_limit_below_one_pixel_is_one_line(workdir, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    image = tmp_path / "a.jpg"
    write_image(image, "rgb")

    assert run_predict(workdir, [image], out, "--max_image_pixels=0") == 2

    assert capsys.readouterr().err == (
        "error: flag --max_image_pixels=0: 0 is not a positive integer\n"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Item 2: every mode to 8-bit RGB by its value range
# ---------------------------------------------------------------------------------------------
def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def row(mode: str, values: list) -> Image.Image:
    """A one-row image of `mode` holding `values` (per pixel: a number, or a list of bands)."""
    if mode == "1":
        return Image.fromarray(np.array([values], bool))
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}.get(mode, "u1")
    raw = {"I": "I;32", "F": "F;32F"}.get(mode, mode)
    data = np.array(values, dtype).tobytes()
    return Image.frombytes(mode, (len(values), 1), data, "raw", raw)


def palette(mode: str = "P") -> Image.Image:
    """Indices 0, 1, 2, 1 into a palette of three colours."""
    im = row("P", [0, 1, 2, 1])
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    return im if mode == "P" else im.convert(mode)


def gray(*values: int) -> list[list[int]]:
    return [[v, v, v] for v in values]


PALETTE_RGB = [[10, 20, 30], [200, 100, 50], [0, 255, 0], [200, 100, 50]]
# (the image, the format it is stored in (None: converted in memory), the mode PIL opens it as,
# the RGB row it must decode to, worked out by hand from `images.to_rgb`'s rules).
MODES = [
    pytest.param(row("1", [0, 1, 1, 0]), "PNG", "1", gray(0, 255, 255, 0), id="1"),
    pytest.param(row("L", [0, 17, 128, 255]), "PNG", "L", gray(0, 17, 128, 255), id="L"),
    # Alpha is dropped: the colour stored under a transparent pixel stays.
    pytest.param(row("LA", [[10, 0], [200, 255]]), "PNG", "LA", gray(10, 200), id="LA"),
    pytest.param(palette(), "PNG", "P", PALETTE_RGB, id="P"),
    pytest.param(palette(), ("PNG", {"transparency": 0}), "P", PALETTE_RGB, id="P-index"),
    pytest.param(
        palette(), ("PNG", {"transparency": bytes([0, 128])}), "P", PALETTE_RGB, id="P-bytes"
    ),
    pytest.param(palette("PA"), None, "PA", PALETTE_RGB, id="PA"),
    pytest.param(
        row("RGBA", [[1, 2, 3, 0], [250, 128, 7, 255]]),
        "PNG",
        "RGBA",
        [[1, 2, 3], [250, 128, 7]],
        id="RGBA",
    ),
    pytest.param(
        row("RGB", [[1, 2, 3], [250, 128, 7]]), "PNG", "RGB", [[1, 2, 3], [250, 128, 7]], id="RGB"
    ),
    # R = round((255 - C) * (255 - K) / 255), and G, B alike.
    pytest.param(
        row("CMYK", [[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 0, 100]]),
        "TIFF",
        "CMYK",
        [[255, 255, 255], [0, 255, 255], [0, 0, 0], [94, 125, 155]],
        id="CMYK",
    ),
    # Full-range BT.601: R = Y + 1.402 (Cr - 128), G = Y - 0.344 (Cb - 128) - 0.714 (Cr - 128),
    # B = Y + 1.772 (Cb - 128), clipped to 0..255.
    pytest.param(
        row("YCbCr", [[128, 128, 128], [0, 128, 128], [0, 128, 255], [255, 255, 128]]),
        "TIFF",
        "YCbCr",
        [[128, 128, 128], [0, 0, 0], [178, 0, 0], [255, 211, 255]],
        id="YCbCr",
    ),
    # 16-bit: round(v * 255 / 65535), values over 255 included.
    pytest.param(
        row("I;16", [0, 128, 129, 257, 32896, 65535]),
        "PNG",
        "I;16",
        gray(0, 0, 1, 1, 128, 255),
        id="I;16-png",
    ),
    pytest.param(
        row("I;16B", [0, 300, 40000, 65535]), "TIFF", "I;16B", gray(0, 1, 156, 255), id="I;16B"
    ),
    # I within 0..65535: that range; outside it: the data's min..max (-100..300).
    pytest.param(row("I", [0, 300, 65535]), "TIFF", "I", gray(0, 1, 255), id="I-16bit"),
    pytest.param(row("I", [-100, 0, 300]), "TIFF", "I", gray(0, 64, 255), id="I-other"),
    # F within 0..1: that range; outside it: the finite min..max (-1..3); NaN and inf -> 0.
    pytest.param(row("F", [0.0, 0.2, 1.0, np.nan]), "TIFF", "F", gray(0, 51, 255, 0), id="F-0..1"),
    pytest.param(
        row("F", [-1.0, 0.0, 3.0, np.inf]), "TIFF", "F", gray(0, 64, 255, 0), id="F-other"
    ),
]


@pytest.mark.parametrize("im, stored, mode, rgb", MODES)
def test_every_mode_decodes_to_rgb_by_its_value_range(im, stored, mode, rgb, capsys, recwarn):
    if stored is None:
        assert im.mode == mode
        got = np.asarray(images.to_rgb(im))
    else:
        fmt, kwargs = stored if isinstance(stored, tuple) else (stored, {})
        data = encoded(im, fmt, **kwargs)
        with Image.open(io.BytesIO(data)) as reopened:
            assert reopened.mode == mode
        got = images.decode_rgb(data, mode)  # the decoder under the builders, predict and viz
    np.testing.assert_array_equal(got, np.array([rgb], np.uint8))
    assert got.dtype == np.uint8
    # No stray PIL warning (P -> RGB warns about per-entry transparency), as a line or not.
    assert capsys.readouterr().err == ""
    assert [str(w.message) for w in recwarn] == []


def close(pixels: np.ndarray, want: np.ndarray) -> None:
    """Within a few levels, as a quality-95 JPEG of `want` is (clipping made 99% of it 255)."""
    diff = np.abs(pixels.astype(np.int16) - want.astype(np.int16))
    assert pixels.shape == want.shape
    assert diff.mean() < 1.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_16_bit_png_is_not_white_in_the_builders_predict_and_viz(workdir, tmp_path, monkeypatch):
    path, want = gray16_png(tmp_path / "gray16.png")

    data, _ = images.rgb_jpeg_bytes(path)  # the builders' call
    close(images.decode_rgb(data), want)

    seen = []
    real = predict.Predictor.preprocess
    monkeypatch.setattr(
        predict.Predictor, "preprocess", lambda self, im: seen.append(im) or real(self, im)
    )
    assert run_predict(workdir, [path], tmp_path / "preds.jsonl") == 0
    close(seen[0], want)

    pixels, _ = cam.read_image(path, 32, (0, 0, 0), (1, 1, 1))
    close(pixels, np.asarray(Image.fromarray(want).resize((32, 32), Image.BILINEAR)))


# ---------------------------------------------------------------------------------------------
# Item 12 (predict's part): no file could be read
# ---------------------------------------------------------------------------------------------
def test_predict_with_every_file_skipped_is_an_error_and_keeps_the_old_output(
    workdir, tmp_path, capsys
):
    notes = tmp_path / "in" / "notes.jpg"
    notes.parent.mkdir()
    notes.write_text("not an image")
    bomb = png_header_only(tmp_path / "in" / "scan.png", 13500, 13500)
    out = tmp_path / "preds.jsonl"
    out.write_text('{"file": "earlier.jpg"}\n')

    status = run_predict(workdir, [notes.parent], out)

    printed = capsys.readouterr()
    assert status == 2
    assert printed.err.splitlines() == [
        f"warning: {notes}: cannot decode image (not a known image format); skipped",
        f"warning: {too_big(bomb, 13500, 13500, images.MAX_IMAGE_PIXELS)}; skipped",
        "error: none of the 2 files could be read as an image (each is named above); no "
        "predictions, nothing written",
    ]
    assert printed.out == ""
    assert out.read_text() == '{"file": "earlier.jpg"}\n'

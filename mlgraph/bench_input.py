"""Input speed of one worker on COCO-sized JPEGs: the JPEG decoders side by side, and the
config's training chain after the old decoder and after the pipeline's.

    python -m mlgraph.bench input --config configs/salgl_coco.py --jpegs 64

`bench_decoders` needs no data set: it makes `num_images` JPEGs of COCO's usual size and
quality (640x480, quality 90, 4:2:0 chroma) from crops of the demo photos (`mlgraph.data.demo`:
photographs shipped in scikit-image, scikit-learn and matplotlib), in memory, and times them in
this one process, i.e. one grain worker:

* decode only, per library, with each one's largest |difference| to PIL's pixels on the same
  files: PIL (`Image.open(...).convert("RGB")`, without `draft`, which would change the pixels),
  simplejpeg (fastdct=False, fastupsample=False: libjpeg-turbo with PIL's settings), OpenCV
  (`cv2.imdecode` to RGB, EXIF orientation ignored as PIL does), pillow-simd, and `mlgraph`:
  `images.decode_rgb`, the pipeline's decoder (simplejpeg for YCbCr/RGB JPEGs, PIL otherwise).
  A library that is not installed is reported missing, not an error. pillow-simd replaces
  Pillow (both are the `PIL` package, and it installs from a source distribution only, with a
  compiler and the libjpeg headers), so it is timed only where it is the PIL installed; its row
  then repeats the PIL row.
* the config's `pipeline.TrainTransform` per image (for SALGL at 448: square resize, flip,
  CutoutPIL 0.5, RandAugment, normalise) after the old decoder (PIL: what TFDS's source used,
  as OpenCV is not a dependency; with OpenCV installed TFDS silently switches to it) and after
  the pipeline's, with the same random draws per image; and where one image's time goes, in
  ms per stage (each stage switched on in turn, so a stage's figure is a difference of two
  timings and carries their noise).

Rates are the best of `repeats` timed passes over all files (a shared machine slows some
passes), in images/s per worker; the target is `TARGET_PER_WORKER` (150: 8 workers feed 1,200
images/s to one accelerator).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import time
from collections.abc import Callable

import ml_collections
import numpy as np
import PIL
from PIL import Image

from mlgraph.data import augment, images, pipeline

COCO_SIZE = (640, 480)  # width, height of most COCO 2014 images
COCO_QUALITY = 90
TARGET_PER_WORKER = 150.0
# Demo photos the files are cut from: the real photographs (not the drawn horse silhouette).
PHOTOS = (
    "astronaut",
    "camera",
    "grace_hopper",
    "motorcycle_left",
    "motorcycle_right",
    "chelsea",
    "coffee",
    "clock",
    "china",
    "flower",
    "coins",
    "rocket",
    "moon",
    "hubble_deep_field",
    "grass",
    "gravel",
    "brick",
)
DECODERS = ("pil", "simplejpeg", "opencv", "pillow-simd", "mlgraph")
# The decoders the training chain is timed after: the old one and the pipeline's.
CHAIN_DECODERS = ("pil", "mlgraph")
# The `augment.Chain` fields switched on one by one for the per-stage times, after the
# crop/resize and normalisation that every chain has, with the value that turns each off.
STAGES = {"flip": False, "cutout": 0.0, "randaugment": None}

Decoder = Callable[[bytes], np.ndarray]


def coco_sized_jpegs(
    num_images: int = 64, seed: int = 0, size: tuple[int, int] = COCO_SIZE
) -> list[bytes]:
    """`num_images` JPEG files (bytes) of `size` (width, height) at quality 90: a random box of
    the photo's aspect-4:3 region (50-100% of its side, at a random place), resized bilinearly.
    The same bytes for the same arguments."""
    from mlgraph.data import demo

    photos = demo._photos()
    rng = np.random.default_rng(seed)
    aspect = size[0] / size[1]
    files = []
    for i in range(num_images):
        photo = photos[PHOTOS[i % len(PHOTOS)]]
        w, h = photo.size
        bw = min(w, h * aspect) * rng.uniform(0.5, 1.0)
        bh = bw / aspect
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        crop = photo.resize(size, Image.BILINEAR, box=(x0, y0, x0 + bw, y0 + bh))
        out = io.BytesIO()
        crop.save(out, format="JPEG", quality=COCO_QUALITY)
        files.append(out.getvalue())
    return files


def pil_distribution() -> str:
    """The distribution that provides `PIL`: 'pillow-simd X' or 'Pillow X'."""
    try:
        simd = importlib.metadata.version("pillow-simd")
    except importlib.metadata.PackageNotFoundError:
        simd = None
    if simd is not None and simd == PIL.__version__:
        return f"pillow-simd {simd}"
    return f"Pillow {PIL.__version__}"


def _pil() -> tuple[Decoder, str]:
    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    return decode, pil_distribution()


def _simplejpeg() -> tuple[Decoder, str]:
    import simplejpeg

    def decode(data: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)

    return decode, f"simplejpeg {simplejpeg.__version__}"


def _opencv() -> tuple[Decoder, str]:
    import cv2

    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 converts while decoding
    flags = (rgb if rgb is not None else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION

    def decode(data: bytes) -> np.ndarray:
        out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if out is None:
            raise ValueError("cv2.imdecode could not decode the image")
        return out if rgb is not None else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)

    return decode, f"opencv {cv2.__version__}"


def _pillow_simd() -> tuple[Decoder, str]:
    if not pil_distribution().startswith("pillow-simd"):
        raise ImportError(
            "not installed: it replaces Pillow and installs from a source distribution only "
            "(a compiler and libjpeg headers); run this bench where it is the installed PIL"
        )
    return _pil()


def _mlgraph() -> tuple[Decoder, str]:
    return (
        lambda data: images.decode_rgb(data, "bench image"),
        f"images.decode_rgb ({images.JPEG_DECODER}, PIL for other formats)",
    )


_LOADERS = {
    "pil": _pil,
    "simplejpeg": _simplejpeg,
    "opencv": _opencv,
    "pillow-simd": _pillow_simd,
    "mlgraph": _mlgraph,
}
_INSTALL = {"simplejpeg": "pip install simplejpeg", "opencv": "pip install opencv-python-headless"}


def available_decoders() -> tuple[dict[str, tuple[Decoder, str]], dict[str, str]]:
    """({name: (decode, version)} of the decoders that import, {name: why missing})."""
    found, missing = {}, {}
    for name in DECODERS:
        try:
            found[name] = _LOADERS[name]()
        except ImportError as e:
            why = str(e) if name == "pillow-simd" else f"not installed ({_INSTALL[name]})"
            missing[name] = why
    return found, missing


def _best_rates(fns: dict[str, Callable[[], object]], count: int, repeats: int) -> dict:
    """{name: count / the fastest of `repeats` timed calls of fns[name]}, after one untimed
    call of each; the calls take turns, so a slow spell of a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: count / seconds for name, seconds in best.items()}


def _transform(
    config, num_classes: int, chain: augment.Chain | None = None
) -> pipeline.TrainTransform:
    """The TrainTransform of `chain`, by default the one `config.data.augment` names."""
    data = config.data
    if chain is None:
        chain = augment.chain(data.augment)
    return pipeline.TrainTransform(config.image_size, num_classes, chain, data.mean, data.std)


def _chain_pass(transform, decode, files: list[bytes], num_classes: int, seed: int) -> None:
    """The chain on every file; `decode` None: the bytes go in, as from a source that leaves
    images encoded, and the pipeline decodes them (`images.decode_rgb`)."""
    labels = np.zeros(num_classes, np.float32)
    for i, data in enumerate(files):
        element = {"image": data if decode is None else decode(data), "labels": labels}
        transform.random_map(element, np.random.default_rng([seed, i]))


def _stage_ms(config, arrays, num_classes: int, repeats: int, seed: int) -> dict[str, float]:
    """ms per image of the chain's stages: the crop/resize + normalisation every chain has,
    then each of `STAGES` that the config's chain has on, as the difference it makes."""
    full = augment.chain(config.data.augment)
    active = [s for s, off in STAGES.items() if getattr(full, s) != off]
    chain = dataclasses.replace(full, **{s: STAGES[s] for s in active})
    labels = np.zeros(num_classes, np.float32)

    def run(t) -> None:
        for i, x in enumerate(arrays):
            t.random_map({"image": x, "labels": labels}, np.random.default_rng([seed, i]))

    chains = {"resize+normalise": _transform(config, num_classes, chain)}
    for s in active:
        chain = dataclasses.replace(chain, **{s: getattr(full, s)})
        chains[s] = _transform(config, num_classes, chain)
    rates = _best_rates(
        {name: lambda t=t: run(t) for name, t in chains.items()}, len(arrays), repeats
    )
    out, previous = {}, 0.0
    for name, rate in rates.items():
        out[name] = 1000.0 / rate - previous
        previous = 1000.0 / rate
    return out


def bench_decoders(
    config: ml_collections.ConfigDict,
    num_images: int = 64,
    repeats: int = 3,
    num_classes: int = 80,
    seed: int = 0,
) -> dict:
    """Decode-only and decode + training-chain images/s of one worker on COCO-sized JPEGs,
    each decoder's max |diff| to PIL's pixels, and ms per image by chain stage (see the module
    docstring). Keys: the files' description, `pil` (the installed PIL), `pipeline_decoder`,
    `decode` {name: {version, images_per_s, max_abs_diff}}, `missing` {name: why}, `chain`
    {name: images_per_s}, `stages_ms`, `target_per_worker`."""
    files = coco_sized_jpegs(num_images, seed)
    found, missing = available_decoders()
    reference = [found["pil"][0](f) for f in files]
    rates = _best_rates(
        {name: lambda fn=fn: [fn(f) for f in files] for name, (fn, _) in found.items()},
        len(files),
        repeats,
    )
    decode = {}
    for name, (fn, version) in found.items():
        diff = max(
            int(np.abs(o.astype(np.int16) - r).max()) if o.shape == r.shape else 255
            for o, r in zip((fn(f) for f in files), reference, strict=True)
        )
        decode[name] = {"version": version, "images_per_s": rates[name], "max_abs_diff": diff}
    transform = _transform(config, num_classes)
    # The old path: the source hands PIL's array; the new one: bytes, decoded in the pipeline.
    chain_decode = {"pil": found["pil"][0], "mlgraph": None}
    chain = _best_rates(
        {
            name: lambda fn=chain_decode[name]: _chain_pass(transform, fn, files, num_classes, seed)
            for name in CHAIN_DECODERS
        },
        len(files),
        repeats,
    )
    stages = {"decode": 1000.0 / decode["mlgraph"]["images_per_s"]}
    stages |= _stage_ms(config, reference, num_classes, repeats, seed)
    return {
        "images": len(files),
        "width": COCO_SIZE[0],
        "height": COCO_SIZE[1],
        "quality": COCO_QUALITY,
        "image_size": config.image_size,
        "pil": pil_distribution(),
        "pipeline_decoder": images.JPEG_DECODER,
        "decode": decode,
        "missing": missing,
        "chain": chain,
        "stages_ms": stages,
        "target_per_worker": TARGET_PER_WORKER,
    }


def format_table(result: dict) -> str:
    """The result of `bench_decoders` as a printable table."""
    lines = [
        f"{result['images']} COCO-sized JPEGs ({result['width']}x{result['height']}, quality "
        f"{result['quality']}), one process = one worker; PIL is {result['pil']}",
        f"{'decoder':<12} {'version':<26} {'decode img/s':>12} {'max|diff| PIL':>13} "
        f"{'chain@' + str(result['image_size']) + ' img/s':>16}",
    ]
    for name in DECODERS:
        if name in result["missing"]:
            lines.append(f"{name:<12} {result['missing'][name]}")
            continue
        d = result["decode"][name]
        chain = result["chain"].get(name)
        chain_s = f"{chain:.1f}" if chain is not None else "-"
        version = d["version"] if name != "mlgraph" else f"= {result['pipeline_decoder']}"
        lines.append(
            f"{name:<12} {version:<26} {d['images_per_s']:>12.1f} {d['max_abs_diff']:>13d} "
            f"{chain_s:>16}"
        )
    stages = ", ".join(f"{k} {v:.2f}" for k, v in result["stages_ms"].items())
    total = sum(result["stages_ms"].values())
    lines.append(f"ms per image by stage: {stages} (sum {total:.2f} ms)")
    target = result["target_per_worker"]
    best = max(result["chain"].values())
    lines.append(
        f"target {target:.0f} img/s per worker (8 workers: {8 * target:,.0f} img/s); "
        f"best chain {best:.1f} img/s = {100 * best / target:.0f}% of it"
    )
    return "\n".join(lines)

"""grain input pipelines: shuffled, augmented, process-sharded training batches, and padded,
masked evaluation batches in which every image counts exactly once.

Decoding happens here when the source hands encoded bytes (a TFDS source opened with
`tfds.decode.SkipDecoding()` for `image`): `images.decode_rgb`, simplejpeg for JPEGs with
exactly PIL's pixels; an image the source already decoded (a uint8 array) is used as it is.
Resizing and augmentation happen here too, with per-example random generators that grain
derives from the pipeline seed and the example's position, so a restored iterator state
reproduces the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from mlgraph.data import augment, images
from mlgraph.errors import ConfigError


def _normalize(img: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    # (x / 255 - mean) / std as one in-place multiply and add over whole rows (the per-channel
    # factors tiled along a row: numpy's loops over a last axis of 3 are slow). Normalising
    # per pixel was once the largest host cost of the training chain after the resize. The
    # values differ by float32 rounding (< 1e-6).
    x = np.array(img, np.float32)
    rows = x.reshape(x.shape[0], -1)
    width = x.shape[1]
    rows *= np.tile((1.0 / (255.0 * std)).astype(np.float32), width)
    rows += np.tile((-mean / std).astype(np.float32), width)
    return x


def _image(element: dict) -> Image.Image:
    """The example's image as a PIL image: encoded bytes are decoded (`images.decode_rgb`,
    errors name the image by its `image_id`); a decoded uint8 array is taken as it is."""
    image = element["image"]
    if isinstance(image, bytes):
        image_id = element.get("image_id")
        if isinstance(image_id, bytes):  # a text image_id read back from TFDS
            image_id = image_id.decode(errors="replace")
        image = images.decode_rgb(image, f"image {image_id}")
    return Image.fromarray(image)


def _labels(element: dict, num_classes: int) -> np.ndarray:
    labels = np.asarray(element["labels"], np.float32)
    if labels.shape != (num_classes,):
        raise ValueError(
            f"image {element.get('image_id')}: label vector of shape {labels.shape}, "
            f"expected ({num_classes},)"
        )
    return labels


def _label_mask(element: dict, num_classes: int) -> np.ndarray:
    """bool [C]: the (image, class) pairs that count. VOC's `difficult` pairs and the pairs an
    `ignored` feature marks (label 0 of a +-1/0 source, e.g. NUS-WIDE 'ov') are left out."""
    mask = np.ones(num_classes, bool)
    for name in ("difficult", "ignored"):
        if element.get(name) is not None:
            mask &= np.asarray(element[name]) == 0
    return mask


class _WithIndex:
    """Adds `index`, the example's position in the split (grain passes the position in the
    repeated stream, hence the modulo)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, index: int, element: dict) -> dict:
        return {**element, "index": np.int32(index % self.size)}


class TrainTransform(grain.transforms.RandomMap):
    """A training chain (`augment.Chain`, the row of `augment.CHAINS` that config.data.augment
    names), then scaling to [0, 1] and normalisation. The chain's steps run in a fixed order:
    its geometric step (square resize or crop) to image_size, horizontal flip (p=0.5) when
    `chain.flip`, CutoutPIL when `chain.cutout > 0`, then its RandAugment; the resize/crop and
    timm RandAugment's geometric ops resample with `chain.interpolation`, timm's fill with the
    data mean x 255. All randomness comes from grain's per-example generator.
    `drop_difficult`: classes present only as VOC difficult objects become negatives.
    An example with an `ignored` feature also gets `label_mask` (bool [C], False = no label
    for that class); for every other data set the output has no `label_mask`."""

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        chain: augment.Chain,
        mean,
        std,
        drop_difficult: bool = False,
    ):
        if not isinstance(chain, augment.Chain):
            raise TypeError(f"chain: expected an augment.Chain, got {type(chain).__name__}")
        self.image_size = image_size
        self.num_classes = num_classes
        self.chain = chain
        self.resample = augment.INTERPOLATIONS[chain.interpolation]
        self.fill = augment.timm_fill(mean)
        self.drop_difficult = drop_difficult
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        """Augment one example (image decoded, or encoded bytes); returns float32 `image`
        [S, S, 3], `labels` and the example's `index` in the split when it has one."""
        chain = self.chain
        img = chain.geometry.apply(_image(element), self.image_size, rng, self.resample)
        if chain.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if chain.cutout > 0:
            img = augment.cutout(img, chain.cutout, rng)
        if chain.randaugment is not None:
            img = chain.randaugment.apply(img, rng, self.resample, self.fill)
        labels = _labels(element, self.num_classes)
        if self.drop_difficult:
            # SSGRL's VOC training labels: a class seen only as difficult objects is negative.
            labels = labels * (1.0 - np.asarray(element["difficult"], np.float32))
        out = {"image": _normalize(img, self.mean, self.std), "labels": labels}
        if "ignored" in element:
            out["label_mask"] = np.asarray(element["ignored"]) == 0
        if "index" in element:  # added by `train_dataset`; absent for a bare example
            out["index"] = element["index"]
        return out


class EvalTransform(grain.transforms.Map):
    """Resize to a square and normalise (the papers' test transform: no TTA), or SSGRL's resize
    then centre crop when `center_crop_from` is set.

    `resize='shorter'`: timm's test transform instead (SigRL): the shorter side to
    `center_crop_from` (or image_size when 0), aspect kept, then the centre crop; timm's
    crop_pct rule gives center_crop_from = floor(image_size / crop_pct), 256 for 224 at 0.875.
    `interpolation`: 'bilinear' or 'bicubic', for whichever resize runs."""

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        mean,
        std,
        center_crop_from: int = 0,
        resize: str = "square",
        interpolation: str = "bilinear",
    ):
        if center_crop_from and center_crop_from < image_size:
            raise ConfigError(
                f"config.data.eval_center_crop_from={center_crop_from}: smaller than "
                f"image_size={image_size}"
            )
        if resize not in ("square", "shorter"):
            raise ConfigError(
                f"config.data.eval_resize='{resize}': expected 'square' (resize to a square) "
                "or 'shorter' (shorter side, aspect kept, then the centre crop)"
            )
        if interpolation not in augment.INTERPOLATIONS:
            raise ConfigError(
                f"config.data.eval_interpolation='{interpolation}': expected one of "
                f"{', '.join(augment.INTERPOLATIONS)}"
            )
        self.image_size = image_size
        self.num_classes = num_classes
        self.center_crop_from = int(center_crop_from)
        self.shorter_side = resize == "shorter"
        self.resample = augment.INTERPOLATIONS[interpolation]
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> EvalTransform:
        """The test transform `config.data` asks for (eval_center_crop_from, eval_resize,
        eval_interpolation; the last two default for configs saved before they existed)."""
        data = config.data
        return cls(
            config.image_size,
            num_classes,
            data.mean,
            data.std,
            center_crop_from=data.eval_center_crop_from,
            resize=data.get("eval_resize", "square"),
            interpolation=data.get("eval_interpolation", "bilinear"),
        )

    def map(self, element: dict) -> dict:
        img = _image(element)
        if self.center_crop_from or self.shorter_side:
            img = augment.center_crop(
                img,
                self.image_size,
                self.center_crop_from or self.image_size,
                shorter_side=self.shorter_side,
                resample=self.resample,
            )
        else:
            img = img.resize((self.image_size, self.image_size), self.resample)
        # VOC marks classes present only as difficult, NUS-WIDE 'ov' the pairs without a label:
        # those (image, class) pairs are left out of every metric, as the VOC devkit, BiAM's
        # compute_AP and the papers do.
        return {
            "image": _normalize(img, self.mean, self.std),
            "labels": _labels(element, self.num_classes),
            "label_mask": _label_mask(element, self.num_classes),
            "mask": np.bool_(True),
        }


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch."""
    return global_batch_size // jax.process_count()


def train_dataset(
    source,
    config: ml_collections.ConfigDict,
    num_classes: int,
    process: tuple[int, int] | None = None,
) -> grain.IterDataset:
    """Infinite, shuffled (reshuffled every epoch), augmented batches of this process's shard:
    `image`, `labels` and `index` (each example's position in `source`), and `label_mask`
    (False = no label) when the examples have an `ignored` feature (NUS-WIDE 'ov').

    `process` = (index, count) defaults to this JAX process's.
    """
    data = config.data
    pi, pc = process or (jax.process_index(), jax.process_count())
    # `index`: the example's position in the split, for per-example state (label matrices).
    ds = grain.MapDataset.source(source).map_with_index(_WithIndex(len(source)))
    ds = ds.seed(config.seed).shuffle().repeat()
    # Augment before sharding: each example's random draws depend on its position in the
    # global stream, so any number of processes sees exactly the global batches one would.
    if data.train_difficult not in ("positive", "negative"):
        raise ConfigError(
            f"config.data.train_difficult='{data.train_difficult}': expected 'positive' or "
            "'negative'"
        )
    drop_difficult = data.train_difficult == "negative"
    if drop_difficult and len(source) and "difficult" not in source[0]:
        raise ConfigError(
            f"config.data.train_difficult='negative': data set '{data.name}' has no 'difficult' "
            "feature (voc2007 and voc2012 have)"
        )
    chain = augment.chain(data.augment)
    ds = ds.random_map(
        TrainTransform(config.image_size, num_classes, chain, data.mean, data.std, drop_difficult)
    )
    ds = ds[pi::pc]
    ds = ds.batch(config.batch_size // pc, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=data.prefetch))
    if data.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return it


def eval_batches(
    source, config: ml_collections.ConfigDict, num_classes: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, this process's shard, in batches padded with mask=False.

    All processes yield the same number of batches (ceil(ceil(n / processes) / local batch)),
    so the jitted eval step runs in lockstep on every host.
    """
    pc, pi = jax.process_count(), jax.process_index()
    local_bs = local_batch_size(config.eval_batch_size)
    steps = math.ceil(math.ceil(len(source) / pc) / local_bs)
    transform = EvalTransform.from_config(config, num_classes)
    ds = grain.MapDataset.source(source)[pi::pc].map(transform).batch(local_bs)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
    shape = (config.image_size, config.image_size, 3)
    for _ in range(steps):
        batch = next(it, None)
        if batch is None:
            batch = {
                "image": np.zeros((0, *shape), np.float32),
                "labels": np.zeros((0, num_classes), np.float32),
                "label_mask": np.zeros((0, num_classes), bool),
                "mask": np.zeros((0,), bool),
            }
        pad = local_bs - len(batch["mask"])
        if pad:
            batch = {
                k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        yield batch

"""Throughput figures (never asserted in tests).

    python -m mlgraph.bench train --config configs/NAME.py [--steps 20] [--peak_tflops 989]
    python -m mlgraph.bench input --config configs/NAME.py [--batches 20]

`train`: the jitted train step on synthetic batches of the config's shape: images/s in all and
per device, step FLOPs from XLA's cost analysis, MFU when the device's peak is given, peak
device memory where the backend reports it, and eval (forward) images/s.
`input`: the grain training pipeline on the config's data set: decoded, augmented images/s, in
all and per worker process.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mlgraph import assets, sharding, train
from mlgraph.data import cooccurrence, datasets, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (after 2 warm-up steps).")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed input batches (after 2 warm-up).")
_CLASSES = flags.DEFINE_integer(
    "num_classes",
    80,
    "Classes of the synthetic batches (the data set's count when the config's assets need it).",
)
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for MFU.")


def _timed(fn, n: int) -> float:
    for _ in range(2):
        out = fn()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def resolve_assets(config, num_classes: int):
    """(config, num_classes) with the config's asset names made into files, as training does.

    Label embeddings by name ('minilm') and 'train_labels' graphs come from the config's data
    set, which must then be built (or be a demo set); its class count replaces `num_classes`.
    """
    model = config.model
    if (
        model.get("embed_path") == assets.MINILM
        or model.get("graph_path") == cooccurrence.TRAIN_LABELS
    ):
        dataset = datasets.open_dataset(config.data)
        return assets.resolve(config, dataset.class_names, dataset.directory), dataset.num_classes
    return assets.resolve(config, [], None), num_classes


def bench_train(config, steps: int, num_classes: int, peak_tflops: float) -> dict[str, float]:
    """Images/s of the train step and of the eval forward pass on synthetic data."""
    config, num_classes = resolve_assets(config, num_classes)
    mesh = sharding.make_mesh()
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    # The synthetic batch is the whole "training set" (per-example state has b rows), each
    # image with one observed positive.
    observed = np.eye(num_classes, dtype=np.float32)[np.arange(b) % num_classes]
    training = datasets.TrainingSplit(range(b), num_classes, observed)
    mod, graphdef, tx, state = train.init_train_state(config, num_classes, 1000, training)
    state = jax.device_put(state, repl)
    state_sh = jax.tree.map(lambda _: repl, state)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.standard_normal((b, s, s, 3), np.float32),
            "labels": (rng.random((b, num_classes)) < 0.05).astype(np.float32),
            "index": np.arange(b, dtype=np.int32),
        },
        data_sh,
    )
    step = jax.jit(
        train.make_train_step(mod, graphdef, tx, config, 1000),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
    )
    flops = (step.lower(state, batch).compile().cost_analysis() or {}).get("flops", 0.0)
    holder = {"state": state}

    def one_step():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    seconds = _timed(one_step, steps)
    predict = jax.jit(
        train.make_predict(graphdef, lambda st: ((st["params"], st["rest"]),)),
        in_shardings=(state_sh, data_sh),
        out_shardings=(data_sh,),
    )
    eval_seconds = _timed(lambda: predict(holder["state"], batch["image"]), steps)
    n = jax.device_count()
    result = {
        "devices": n,
        "train_images_per_s": b / seconds,
        "train_images_per_s_per_device": b / seconds / n,
        "step_tflops": flops / 1e12,
        "eval_images_per_s": b / eval_seconds,
    }
    if peak_tflops and flops:
        result["mfu_percent"] = 100 * flops / seconds / (peak_tflops * 1e12 * n)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    return result


def bench_input(config, batches: int) -> dict[str, float]:
    """Decoded, augmented images/s of the training pipeline."""
    dataset = datasets.open_dataset(config.data)
    source = dataset.sources[config.data.train_split]
    it = iter(pipeline.train_dataset(source, config, dataset.num_classes))
    local_bs = pipeline.local_batch_size(config.batch_size)
    for _ in range(2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * local_bs / (time.perf_counter() - t0)
    workers = max(config.data.worker_count, 1)
    return {
        "image_size": config.image_size,
        "workers": config.data.worker_count,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / workers,
    }


def main(argv: list[str]) -> None:
    """Entry point after flag parsing."""
    logging.set_verbosity(logging.WARNING)
    if len(argv) != 2 or argv[1] not in ("train", "input"):
        raise app.UsageError("usage: python -m mlgraph.bench train|input --config FILE")
    config = _CONFIG.value
    if argv[1] == "train":
        result = bench_train(config, _STEPS.value, _CLASSES.value, _PEAK.value)
    else:
        result = bench_input(config, _BATCHES.value)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    app.run(main)

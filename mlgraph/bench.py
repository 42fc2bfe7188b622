"""Throughput figures (never asserted in tests).

    python -m mlgraph.bench train --config configs/NAME.py [--steps 20] [--peak_tflops 989]
    python -m mlgraph.bench train --config configs/salgl_coco.py --against torch [--steps 5]
    python -m mlgraph.bench input --config configs/NAME.py [--batches 20]
    python -m mlgraph.bench input --config configs/NAME.py --jpegs 64
    python -m mlgraph.bench memory --config configs/NAME.py [--num_classes 1006] [--batch 64]
    python -m mlgraph.bench train|input|memory --workdir DIR    (a run's own config)

`memory`: compiles (without running) the train step at `config.batch_size` and the eval
forward at `--batch` (default `config.eval_batch_size`) over all `--num_classes` labels, and
prints XLA's memory analysis of each (arguments, outputs, temporaries, and their sum less the
donated or aliased bytes: the peak the program needs on one device).

`train`: the jitted train step on synthetic batches of the config's shape: images/s in all and
per device, step FLOPs from XLA's cost analysis, MFU (the device's peak from --peak_tflops or,
for H100/H200, A100 and TPU v4/v5e/v5p, from `PEAK_TFLOPS`), XLA's memory analysis of the
compiled step, peak device memory where the backend reports it, and eval (forward) images/s.
`--profile DIR` also writes a profiler trace of the timed steps and prints the step's FLOPs by
part (backbone, encoder, attention, GGNN, ..., forward and backward; loss, optimizer, EMA).
`--against torch` (SALGL): the same model in plain PyTorch with the same weights and batch,
timed beside mlgraph's, train step and eval forward, and mlgraph's speed-up
(`mlgraph.bench_torch`).
`input`: the grain training pipeline on the config's data set: decoded, augmented images/s, in
all and per worker process; with `--jpegs N`, no data set: N synthetic COCO-sized JPEGs, each
JPEG decoder's images/s and pixel difference to PIL, and the config's training chain per
worker (`mlgraph.bench_input`).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mlgraph import assets, evaluation, sharding, step_cost, train_state, train_step
from mlgraph import workdir as workdirs
from mlgraph.data import datasets, pipeline
from mlgraph.errors import ConfigError, DataError, MlgraphError
from mlgraph.labels import cooccurrence

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training workdir: bench the config it was trained with (not --config)."
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (after 2 warm-up steps).")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed input batches (after 2 warm-up).")
_CLASSES = flags.DEFINE_integer(
    "num_classes",
    80,
    "Classes of the synthetic batches (the data set's count when the config's assets need it).",
)
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for MFU.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "train: write a JAX profiler trace here and print the FLOPs by part."
)
_JPEGS = flags.DEFINE_integer(
    "jpegs",
    0,
    "input: time the JPEG decoders and the config's training chain on this many synthetic "
    "COCO-sized JPEGs, one worker, no data set needed (mlgraph.bench_input); 0 = the data set.",
)
_AGAINST = flags.DEFINE_enum(
    "against", None, ["torch"], "train: time the same model in PyTorch beside mlgraph's."
)
_BATCH = flags.DEFINE_integer("batch", 0, "memory: eval batch (0 = config.eval_batch_size).")


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
    named_assets = (("embed_path", assets.MINILM), ("graph_path", cooccurrence.TRAIN_LABELS))
    named = [f"config.model.{k}='{v}'" for k, v in named_assets if model.get(k) == v]
    if named:
        try:
            dataset = datasets.open_dataset(config.data)
        except DataError as e:
            raise DataError(
                f"{e} (the bench reads it for {' and '.join(named)}; without the data set, point "
                "them at .npy files or, for SALGL, give --config.model.embed_type=checkpoint "
                "--config.model.embed_path= --config.model.embed_dim=768, with --num_classes)"
            ) from None
        return assets.resolve(config, dataset.class_names, dataset.directory), dataset.num_classes
    return assets.resolve(config, [], None), num_classes


def synthetic_training(batch_size: int, num_classes: int) -> datasets.TrainingSplit:
    """The synthetic batch as the whole "training set" (per-example state has one row per
    image), each image with one observed positive, the last twelfth of the classes unseen
    (the NUS-WIDE open-vocabulary proportion, 81 of 1,006)."""
    observed = np.eye(num_classes, dtype=np.float32)[np.arange(batch_size) % num_classes]
    unseen = tuple(range(num_classes - max(1, num_classes // 12), num_classes))
    return datasets.TrainingSplit(range(batch_size), num_classes, observed, unseen=unseen)


# Dense bf16 peak TFLOP/s of one device (vendor figures), for MFU when --peak_tflops is not
# given; matched against `device_kind` in lower case.
PEAK_TFLOPS = {
    "h200": 989.0,
    "h100": 989.0,
    "a100": 312.0,
    "tpu v5p": 459.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v4": 275.0,
}


def peak_tflops_of(device_kind: str) -> float:
    """The table's peak for a device kind (e.g. 'NVIDIA H100 80GB HBM3'), 0 if unknown."""
    kind = device_kind.lower()
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)


def bench_train(
    config, steps: int, num_classes: int, peak_tflops: float, profile_dir: str | None = None
) -> dict[str, float]:
    """Images/s of the train step and of the eval forward pass on synthetic data; with
    `profile_dir`, the step's FLOPs by part (`mlgraph.step_cost`) and a profiler trace of the
    timed steps."""
    config, num_classes = resolve_assets(config, num_classes)
    mesh = sharding.make_mesh()
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    training = synthetic_training(b, num_classes)
    mod, graphdef, tx, state = train_state.init_train_state(config, num_classes, 1000, training)
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
        train_step.make_train_step(mod, graphdef, tx, config, 1000),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
        # As in training: without it every step allocates a new state, which slows the step.
        donate_argnums=0,
    )
    compiled = step.lower(state, batch).compile()
    flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
    memory = _memory(compiled)
    holder = {"state": state}

    def one_step():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    if profile_dir:
        parts, total = step_cost.cost_by_part(
            train_step.make_train_step(mod, graphdef, tx, config, 1000), state, batch
        )
        print(step_cost.format_table(parts, total))
        with jax.profiler.trace(profile_dir):
            seconds = _timed(one_step, steps)
        print(f"profiler trace: {profile_dir} (open with TensorBoard's profile plugin or Perfetto)")
    else:
        seconds = _timed(one_step, steps)
    predict = jax.jit(
        evaluation.make_predict(graphdef, evaluation.live),
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
    peak_tflops = peak_tflops or peak_tflops_of(jax.devices()[0].device_kind)
    if peak_tflops and flops:
        result["peak_tflops_per_device"] = peak_tflops
        result["mfu_percent"] = 100 * flops / seconds / (peak_tflops * 1e12 * n)
    result |= {f"step_{k}": v for k, v in memory.items()}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    return result


def _memory(compiled) -> dict[str, float]:
    """XLA's memory analysis of a compiled program, in GiB."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 2.0**30
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "arguments_gib": m.argument_size_in_bytes / gib,
        "outputs_gib": m.output_size_in_bytes / gib,
        "temporaries_gib": m.temp_size_in_bytes / gib,
        "peak_gib": peak / gib,
    }


def bench_memory(config, num_classes: int, eval_batch: int) -> dict[str, float]:
    """XLA's memory analysis of the train step and of the eval forward, compiled for
    abstract inputs of the config's shapes (nothing runs)."""
    config, num_classes = resolve_assets(config, num_classes)
    mesh = sharding.make_mesh()
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    eval_batch = eval_batch or config.eval_batch_size
    training = synthetic_training(b, num_classes)
    mod, graphdef, tx, state = train_state.abstract_train_state(config, num_classes, 1000, training)
    abstract = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree
    )
    state_abs = abstract(state, repl)
    state_sh = jax.tree.map(lambda _: repl, state)
    batch = {
        "image": np.zeros((b, s, s, 3), np.float32),
        "labels": np.zeros((b, num_classes), np.float32),
        "index": np.zeros((b,), np.int32),
    }
    step = jax.jit(
        train_step.make_train_step(mod, graphdef, tx, config, 1000),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    train_mem = _memory(step.lower(state_abs, abstract(batch, data_sh)).compile())
    predict = jax.jit(
        evaluation.make_predict(graphdef, evaluation.live),
        in_shardings=(state_sh, data_sh),
        out_shardings=(data_sh,),
    )
    images = jax.ShapeDtypeStruct((eval_batch, s, s, 3), np.float32, sharding=data_sh)
    eval_mem = _memory(predict.lower(state_abs, images).compile())
    result = {"num_classes": num_classes, "train_batch": b, "eval_batch": eval_batch}
    result |= {f"train_{k}": v for k, v in train_mem.items()}
    result |= {f"eval_{k}": v for k, v in eval_mem.items()}
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
    if len(argv) != 2 or argv[1] not in ("train", "input", "memory"):
        raise app.UsageError(
            "usage: python -m mlgraph.bench train|input|memory --config FILE (or --workdir DIR)"
        )
    try:
        result = _run(argv[1], _config())
    except MlgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is None:
        return
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


def _config():
    """The config to bench: `--config`'s, or the one `--workdir`'s run was trained with.

    Raises:
      ConfigError: neither or both given.
    """
    if (_CONFIG.value is None) == (_WORKDIR.value is None):
        raise ConfigError("give exactly one of --config FILE or --workdir DIR")
    return _CONFIG.value if _WORKDIR.value is None else workdirs.read_config(_WORKDIR.value)


def _run(command: str, config) -> dict | None:
    """The figures of one bench command (None: it printed its own table)."""
    if command == "train" and _AGAINST.value == "torch":
        from mlgraph import bench_torch

        config, num_classes = resolve_assets(config, _CLASSES.value)
        result = bench_torch.bench_against_torch(config, _STEPS.value, num_classes)
    elif command == "train":
        result = bench_train(config, _STEPS.value, _CLASSES.value, _PEAK.value, _PROFILE.value)
    elif command == "input" and _JPEGS.value:
        from mlgraph import bench_input as input_bench

        print(input_bench.format_table(input_bench.bench_decoders(config, _JPEGS.value)))
        return None
    elif command == "memory":
        result = bench_memory(config, _CLASSES.value, _BATCH.value)
    else:
        result = bench_input(config, _BATCHES.value)
    return result


if __name__ == "__main__":
    app.run(main)

"""Throughput figures (never asserted in tests).

    python -m mlgraph.bench train --config configs/NAME.py [--steps 20] [--peak_tflops 989]
    python -m mlgraph.bench train --config configs/salgl_coco.py --against torch [--steps 5]
    python -m mlgraph.bench input --config configs/NAME.py [--batches 20]
    python -m mlgraph.bench input --config configs/NAME.py --jpegs 64
    python -m mlgraph.bench memory --config configs/NAME.py [--num_classes 1006] [--eval_batch 64]
    python -m mlgraph.bench compile --config configs/NAME.py --topology v5e:4x4|h100:8 \
        [--batch B] [--eval_batch B] [--num_classes C] [--by_part]
    python -m mlgraph.bench train|input|memory|compile --workdir DIR    (a run's own config)

`memory`: compiles (without running) the train step at `--batch` (default `config.batch_size`)
and the eval forward at `--eval_batch` (default `config.eval_batch_size`) over all
`--num_classes` labels for this host's devices, and prints XLA's memory analysis of each
(arguments, outputs, temporaries, and their sum less the donated or aliased bytes: the peak the
program needs on one device).

`compile`: the same programs compiled ahead of time for a TPU slice or NVIDIA GPUs that this
host need not have (`mlgraph.bench_compile`; `pip install 'mlgraph[aot]'`): memory per chip,
whether it fits, the step's FLOPs per chip and, on TPU, XLA's cost model's step time with the
throughput and MFU it implies, all named `modelled_*`; `--by_part`, the modelled time of each
part of the step (`mlgraph.step_cost`).

`train`: the jitted train step on synthetic batches of the config's shape: images/s in all and
per device, step FLOPs from XLA's cost analysis, MFU (the device's peak from --peak_tflops or,
for the chips of `mlgraph.accelerators`), XLA's memory analysis of the
compiled step, peak device memory where the backend reports it, and eval (forward) images/s.
`--profile DIR` also writes a profiler trace of the timed steps and prints the step's FLOPs by
part (backbone, encoder, attention, GGNN, ..., forward and backward; loss, optimizer, EMA).
`--against torch` (`mlgraph.bench_torch.METHODS`: SALGL, SSGRL, Query2Label, SigRL, ML-GCN):
the same model in plain PyTorch with the same weights and batch, timed beside mlgraph's, train
step and eval forward, and mlgraph's speed-up (`mlgraph.bench_torch`).
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

from mlgraph import (
    accelerators,
    assets,
    bench_compile,
    cli,
    evaluation,
    sharding,
    step_cost,
    train_state,
    train_step,
)
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
_BATCH = flags.DEFINE_integer("batch", 0, "memory, compile: global train batch (0 = config's).")
_EVAL_BATCH = flags.DEFINE_integer(
    "eval_batch", 0, "memory, compile: eval batch (0 = config.eval_batch_size)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    f"compile: the devices to compile for ({accelerators.EXAMPLES}; mlgraph.accelerators).",
)
_BY_PART = flags.DEFINE_boolean(
    "by_part", False, "compile (TPU): the modelled time of each part of the train step."
)


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


def bench_train(
    config, steps: int, num_classes: int, peak_tflops: float, profile_dir: str | None = None
) -> dict[str, float]:
    """Images/s of the train step and of the eval forward pass on synthetic data; with
    `profile_dir`, the step's FLOPs by part (`mlgraph.step_cost`) and a profiler trace of the
    timed steps."""
    config, num_classes = resolve_assets(config, num_classes)
    mesh = sharding.make_mesh()
    data_sh = sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    training = bench_compile.synthetic_training(b, num_classes)
    mod, graphdef, tx, state = train_state.init_train_state(config, num_classes, 1000, training)
    state = jax.device_put(state, sharding.state_shardings(mesh, state))
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.standard_normal((b, s, s, 3), np.float32),
            "labels": (rng.random((b, num_classes)) < 0.05).astype(np.float32),
            "index": np.arange(b, dtype=np.int32),
        },
        data_sh,
    )
    step = train_step.jit_train_step(mod, graphdef, tx, config, 1000, mesh, state)
    compiled = step.lower(state, batch).compile()
    flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
    memory = bench_compile.memory_gib(compiled)
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
        in_shardings=(sharding.shardings_of(state), data_sh),
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
    peak_tflops = peak_tflops or accelerators.peak_tflops_of(jax.devices()[0].device_kind)
    if peak_tflops and flops:
        result["peak_tflops_per_device"] = peak_tflops
        result["mfu_percent"] = 100 * flops / seconds / (peak_tflops * 1e12 * n)
    result |= {f"step_{k}": v for k, v in memory.items()}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    return result


def bench_memory(config, num_classes: int, batch: int, eval_batch: int) -> dict[str, float]:
    """XLA's memory analysis of the train step (at `batch`, 0 = the config's) and of the eval
    forward (at `eval_batch`, 0 = the config's), compiled for this host's devices for abstract
    inputs of the config's shapes (nothing runs)."""
    config, num_classes = resolve_assets(config, num_classes)
    if batch:
        config.batch_size = batch
    eval_batch = eval_batch or config.eval_batch_size
    programs = bench_compile.compile_programs(
        config, num_classes, eval_batch, jax.devices(), jax.default_backend()
    )
    result = {
        "num_classes": num_classes,
        "train_batch": config.batch_size,
        "eval_batch": eval_batch,
    }
    result |= {f"train_{k}": v for k, v in bench_compile.memory_gib(programs["train"]).items()}
    result |= {f"eval_{k}": v for k, v in bench_compile.memory_gib(programs["eval"]).items()}
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


COMMANDS = ("train", "input", "memory", "compile")


def main(argv: list[str]) -> None:
    """Entry point after flag parsing."""
    logging.set_verbosity(logging.WARNING)
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(
            f"usage: python -m mlgraph.bench {'|'.join(COMMANDS)} --config FILE (or --workdir DIR)"
        )
    try:
        result = _run(argv[1], _config())
    except MlgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is None:
        return
    if "device" not in result:
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
        result = bench_memory(config, _CLASSES.value, _BATCH.value, _EVAL_BATCH.value)
    elif command == "compile":
        if not _TOPOLOGY.value:
            raise ConfigError(f"compile: give --topology (e.g. {accelerators.EXAMPLES})")
        classes = _CLASSES.value if flags.FLAGS["num_classes"].present else 0
        result = bench_compile.bench_compile(
            config, _TOPOLOGY.value, classes, _BATCH.value, _EVAL_BATCH.value, _BY_PART.value
        )
    else:
        result = bench_input(config, _BATCHES.value)
    return result


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_config_flags)

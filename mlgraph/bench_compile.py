"""Ahead-of-time compilation of a config's programs for devices this host need not have.

    python -m mlgraph.bench compile --config configs/salgl_coco.py --topology v5e:4x4
    python -m mlgraph.bench compile --config configs/salgl_coco.py --topology h100:8 [--batch 256]

The train state is built abstractly (`train_state.abstract_train_state`: `nnx.eval_shape`, no
initialisation runs and no weights are read), the mesh is the training mesh
(`sharding.make_mesh`) over the target's compile-only devices (`mlgraph.accelerators`), and
the programs are the ones training runs: the method's train step with the state donated (EMA
and finite check included) at the config's global batch, and the eval forward at
`eval_batch_size` over every class. Asset names in the config (MiniLM label embeddings,
training-label graphs) become zero-filled files of the same shapes, since only shapes reach the
compiler, so no data set is needed.

Printed per chip: XLA's memory analysis of each program (peak = arguments + outputs +
temporaries - aliased), whether it fits in the chip's memory, the compiled step's FLOPs and,
on TPU, the step time from XLA's TPU cost model ("modelled", never a measurement; see
`modelled_step_seconds`) with the throughput and MFU it implies.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mlgraph import (
    accelerators,
    assets,
    evaluation,
    sharding,
    step_cost,
    train_state,
    train_step,
)
from mlgraph.data import datasets, demo, registry
from mlgraph.errors import ConfigError, MlgraphError
from mlgraph.labels import cooccurrence
from mlgraph.models import layers

GIB = 2.0**30
MINILM_WIDTH = 384  # all-MiniLM-L6-v2's sentence embedding


def stand_in_assets(config: ml_collections.ConfigDict, num_classes: int, directory: pathlib.Path):
    """A copy of `config` whose asset names (`assets.MINILM` embeddings, `train_labels`
    graphs) are zero-filled files of their shapes in `directory`; `init_from` is dropped
    (weights change values, never shapes)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = ""
    model = config.model
    if model.get("embed_path") == assets.MINILM:
        path = directory / "embeddings.npy"
        np.save(path, np.zeros((num_classes, MINILM_WIDTH), np.float32))
        model.embed_path = str(path)
    if model.get("graph_path") == cooccurrence.TRAIN_LABELS:
        path = directory / "counts.npz"
        # Ones, not zeros: graph construction divides by the label counts.
        cooccurrence.save_counts(path, np.ones((num_classes, num_classes)))
        model.graph_path = str(path)
    return config


def synthetic_training(batch_size: int, num_classes: int) -> datasets.TrainingSplit:
    """The synthetic batch as the whole "training set" (per-example state has one row per
    image), each image with one observed positive, the last twelfth of the classes unseen
    (the NUS-WIDE open-vocabulary proportion, 81 of 1,006)."""
    observed = np.eye(num_classes, dtype=np.float32)[np.arange(batch_size) % num_classes]
    unseen = tuple(range(num_classes - max(1, num_classes // 12), num_classes))
    return datasets.TrainingSplit(range(batch_size), num_classes, observed, unseen=unseen)


def memory_gib(compiled) -> dict[str, float]:
    """XLA's memory analysis of a compiled program on one device, GiB (empty if the backend
    gives none)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "arguments_gib": m.argument_size_in_bytes / GIB,
        "outputs_gib": m.output_size_in_bytes / GIB,
        "temporaries_gib": m.temp_size_in_bytes / GIB,
        "peak_gib": peak / GIB,
    }


def _cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled program on one device. The CUDA plugin gives none for
    a deviceless compile, so there XLA's HLO cost analysis (the one every backend's figures
    start from) is run on the compiled, partitioned module with the host's CPU client."""
    analysis = compiled.cost_analysis()
    if analysis is None:
        from jax._src.lib import xla_client  # no public API runs it on a given module

        module = compiled.runtime_executable().hlo_modules()[0]
        cpu = jax.devices("cpu")[0].client
        analysis = xla_client._xla.hlo_module_cost_analysis(cpu, module)
        # The CPU's cost model knows nothing of the GPU: only the counts are kept.
        analysis = {k: analysis[k] for k in ("flops", "bytes accessed") if k in analysis}
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return analysis


class CompileError(MlgraphError):
    """XLA could not compile a program for the target (other than for lack of memory)."""


class OutOfMemory(Exception):
    """XLA refused to compile a program that does not fit in a device's memory; the message
    says what it needs ("needs 100.16 GiB of 15.75")."""


# XLA's TPU compiler's refusals: after memory-space assignment ("Used 20.5G of 15.75G hbm")
# or before it, for temporaries alone ("the total memory required for HLO temporaries
# (100.16G) exceeds available HBM (15.75G)").
_TPU_OOM = (
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM "
               r"\(([\d.]+)([KMGT])\)"),
)  # fmt: skip
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


PROGRAMS = {"train": "the train step", "eval": "the eval forward"}


def compiler_options(platform: str) -> dict[str, Any]:
    """XLA options of an ahead-of-time compile for `platform` ('tpu', 'gpu', 'cpu').

    GPUs: matrix products through cuBLAS rather than Triton GEMM fusions. Without a device
    to autotune on, XLA's GPU compiler picks Triton tiles by heuristics, and for SALGL's
    encoder (bf16 [3136, 2048] x [2048, 2048], R101 at 448 px, 16 images per GPU) it finds
    none ("INTERNAL: Couldn't find output tile sizes that satisfy hlo", jaxlib 0.10.2, with
    and without sm_90a); a GPU that autotunes chooses between both.
    """
    return {"xla_gpu_enable_triton_gemm": False} if platform == "gpu" else {}


def _compile(lowered, what: str, options: dict | None = None):
    """`lowered.compile(options)`; an out-of-memory refusal raised as `OutOfMemory`, any other
    failure as a `CompileError` naming XLA's first line."""
    try:
        return lowered.compile(compiler_options=options or None)
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            raise CompileError(f"XLA could not compile {what}: {first}") from None
        for pattern in _TPU_OOM:
            if (m := pattern.search(text)) is not None:
                needed = float(m.group(1)) * _UNIT[m.group(2)] / GIB
                capacity = float(m.group(3)) * _UNIT[m.group(4)] / GIB
                raise OutOfMemory(f"needs {needed:.2f} GiB of {capacity:.2f}") from None
        first = text.strip().splitlines()[0]
        raise OutOfMemory(f"XLA: {first}") from None


@contextlib.contextmanager
def persistent_cache_off_for(platform: str):
    """JAX's persistent compilation cache off while compiling for another platform than the
    host's: it would store executables it cannot load back ("PjRtCompiler must be constructed
    with a Client to call DeserializeLoadedExecutable") and warn on every later read."""
    enabled = jax.config.jax_enable_compilation_cache
    local = platform == jax.default_backend()
    if not local:
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        if not local:
            jax.config.update("jax_enable_compilation_cache", enabled)


def abstract_batch(
    batch_size: int, image_size: int, num_classes: int, sharding=None
) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch's shapes and dtypes, as the input pipeline makes them."""
    b, s = batch_size, image_size
    return {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), np.float32, sharding=sharding),
        "labels": jax.ShapeDtypeStruct((b, num_classes), np.float32, sharding=sharding),
        "index": jax.ShapeDtypeStruct((b,), np.int32, sharding=sharding),
    }


def lower_programs(
    config: ml_collections.ConfigDict,
    num_classes: int,
    eval_batch: int,
    devices,
    platform: str,
) -> dict[str, Any]:
    """The train step and the eval forward of `config`, lowered for `devices` (traced for
    `platform`): {"train": lowered step, "eval": lowered forward}."""
    mesh = sharding.make_mesh(devices)
    sharding.check_batch_size(config.batch_size, devices=len(devices))
    sharding.check_batch_size(eval_batch, "eval_batch_size", devices=len(devices))
    data_sh = sharding.batch_sharded(mesh)
    b, s = config.batch_size, config.image_size
    training = synthetic_training(b, num_classes)
    with layers.compiling_for(platform):
        mod, graphdef, tx, state = train_state.abstract_train_state(
            config, num_classes, 1000, training
        )
        state_abs = sharding.place_like(state, sharding.state_shardings(mesh, state))
        batch = abstract_batch(b, s, num_classes, data_sh)
        step = train_step.jit_train_step(mod, graphdef, tx, config, 1000, mesh, state_abs)
        predict = jax.jit(
            evaluation.make_predict(graphdef, evaluation.live),
            in_shardings=(sharding.shardings_of(state_abs), data_sh),
            out_shardings=(data_sh,),
        )
        images = jax.ShapeDtypeStruct((eval_batch, s, s, 3), np.float32, sharding=data_sh)
        lowered = {"train": step.lower(state_abs, batch), "eval": predict.lower(state_abs, images)}
        if platform == "gpu":
            # The GPU's compiled program runs matrix products and convolutions as library
            # calls, which XLA's cost analysis does not count: the step's FLOPs per device are
            # XLA's count of the whole step lowered for the host (before its optimisations)
            # over the devices, as `mlgraph.step_cost` counts.
            step_fn = train_step.make_train_step(mod, graphdef, tx, config, 1000)
            host = jax.jit(step_fn).lower(*jax.tree.map(_unsharded, (state_abs, batch)))
            lowered["train_flops"] = float(_cost(host).get("flops", 0.0)) / len(devices)
        return lowered


def _unsharded(a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def compile_programs(
    config: ml_collections.ConfigDict,
    num_classes: int,
    eval_batch: int,
    devices,
    platform: str,
) -> dict[str, Any]:
    """`lower_programs`'s programs compiled: {"train": compiled step, "eval": compiled
    forward}; a program XLA refuses for lack of memory raises `OutOfMemory`."""
    lowered = lower_programs(config, num_classes, eval_batch, devices, platform)
    with persistent_cache_off_for(platform):
        options = compiler_options(platform) if platform != jax.default_backend() else None
        return {name: _compile(lowered[name], what, options) for name, what in PROGRAMS.items()}


def program_figures(compiled, compile_s: float) -> dict[str, Any]:
    """What `bench compile` reads of a compiled program, as JSON-able numbers: XLA's memory
    analysis (`memory_gib`), its cost analysis (FLOPs, bytes accessed, the cost model's
    `optimal_seconds` where there is one), the ops the cost model cannot cost, and the
    compile time."""
    cost = _cost(compiled)
    return {
        "memory": memory_gib(compiled),
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "optimal_seconds": None
        if "optimal_seconds" not in cost
        else float(cost["optimal_seconds"]),
        "uncosted_ops": uncosted_ops(compiled.as_text()),
        "compile_s": compile_s,
    }


def compiler_versions() -> dict[str, str]:
    """Versions of the packages that compile: jax, jaxlib, libtpu and the CUDA plugin."""
    versions = {}
    for package in ("jax", "jaxlib", "libtpu", "jax-cuda12-pjrt"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "-"
    return versions


FIGURES_VERSION = 2  # of what `compiled_figures` keeps: a new one compiles again


def compiled_figures(
    lowered, chip: accelerators.Chip, cache_dir: pathlib.Path | None, what: str = "the program"
) -> dict[str, Any]:
    """`program_figures` of `lowered` compiled, or of an earlier compile of the same program:
    keyed by the lowered program's text, the chip and the compilers' versions, the figures of
    each compile are kept in `cache_dir` (None: not kept), since a paper config's train step
    takes many minutes to compile for a TPU on a CPU host and the same program always gives
    the same figures. An out-of-memory refusal is kept too, as {"out_of_memory": message}.
    A cached entry has "cached": true."""
    options = compiler_options(chip.platform)
    key = hashlib.sha256(
        json.dumps(
            [FIGURES_VERSION, lowered.as_text(), chip.name, options, compiler_versions()]
        ).encode()
    ).hexdigest()
    path = None if cache_dir is None else cache_dir / f"{key}.json"
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text()) | {"cached": True}
        except (OSError, ValueError):
            pass  # an unreadable entry is compiled again and rewritten
    t0 = time.perf_counter()
    with persistent_cache_off_for(chip.platform):
        try:
            compiled = _compile(lowered, what, options)
            figures = program_figures(compiled, time.perf_counter() - t0)
        except OutOfMemory as e:
            figures = {"out_of_memory": str(e), "compile_s": time.perf_counter() - t0}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(figures))
            os.replace(tmp, path)  # a reader never sees half an entry
        except OSError as e:  # the figures are still printed; only the next run recompiles
            print(
                f"warning: cannot keep the compile's figures in {path.parent} "
                f"({e.strerror or e}); the next run compiles again",
                file=sys.stderr,
            )
    return figures | {"cached": False}


# XLA's TPU cost model has no cost for the TPU compiler's own `ConcatBitcast` custom calls (a
# concatenation its layout assignment made free) and counts each as -1 s in `optimal_seconds`:
# baseline_demo's step on v5e:2x2 holds 8 and models -7.9994 s, salgl_demo's 46 and -45.9940 s,
# their eval forwards 1 and 13 (-0.9998 s, -12.9983 s); the remainders (0.6, 6.1, 0.19 and
# 1.7 ms) lie just above the roofline of the same programs, as a sound model's must.
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)


def uncosted_ops(hlo_text: str) -> int:
    """How many instructions of a compiled program the TPU cost model charges -1 s."""
    return sum(hlo_text.count(f'custom_call_target="{t}"') for t in UNCOSTED_CUSTOM_CALLS)


def modelled_step_seconds(figures: dict) -> float | None:
    """The run time XLA's TPU cost model gives a compiled program (`program_figures`),
    corrected for the ops it cannot cost (`UNCOSTED_CUSTOM_CALLS`); None where the backend has
    no cost model (GPUs).

    Raises:
      ValueError: the corrected time is still not positive (an op the model cannot cost that
        this correction does not know), rather than print a time that is not one.
    """
    seconds = figures["optimal_seconds"]
    if seconds is None:
        return None
    corrected = seconds + figures["uncosted_ops"]
    if corrected <= 0:
        raise ValueError(
            f"XLA's cost model gives {seconds:.4f} s with {figures['uncosted_ops']} uncosted "
            "ops accounted for"
        )
    return corrected


def roofline_seconds(figures: dict, chip: accelerators.Chip) -> float:
    """A compiled program's roofline time on one chip: its FLOPs at the chip's peak or its
    bytes accessed at the chip's HBM bandwidth, whichever is longer (XLA's cost analysis of the
    compiled, fused program; a lower bound on any real or modelled time)."""
    return max(
        figures["flops"] / (chip.peak_tflops * 1e12),
        figures["bytes_accessed"] / (chip.hbm_gb_per_s * 1e9),
    )


def _dtype_of(value):
    # `np.result_type` has no PRNG key dtypes; arrays and ShapeDtypeStructs carry theirs.
    return value.dtype if hasattr(value, "dtype") else np.result_type(value)


def modelled_by_part(
    config: ml_collections.ConfigDict, num_classes: int, target: accelerators.Target
) -> tuple[dict[str, dict | None], dict]:
    """The train step's parts (`step_cost.measure_by_part`: backbone, encoder, GGNN, ...,
    forward and backward; loss, optimizer, EMA) each compiled alone for one chip of a TPU
    `target` at the per-chip batch: ({part: figures}, the whole step's figures), figures being
    `modelled_s`, `roofline_s` and `flops`. The parts run on one chip as the step does on each
    chip of a data-parallel slice, less the gradient all-reduce."""
    n = target.device_count
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size //= n
    b, s = config.batch_size, config.image_size
    device = jax.sharding.SingleDeviceSharding(target.devices[0])

    def measure(fn, args) -> dict:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), _dtype_of(a), sharding=device), args
        )
        figures = program_figures(_compile(jax.jit(fn).lower(*abstract), "a part"), 0.0)
        return {
            "modelled_s": modelled_step_seconds(figures),
            "roofline_s": roofline_seconds(figures, target.chip),
            "flops": figures["flops"],
        }

    platform = target.chip.platform
    with layers.compiling_for(platform), persistent_cache_off_for(platform):
        mod, graphdef, tx, state = train_state.abstract_train_state(
            config, num_classes, 1000, synthetic_training(b, num_classes)
        )
        batch = abstract_batch(b, s, num_classes)
        step = train_step.make_train_step(mod, graphdef, tx, config, 1000)
        return step_cost.measure_by_part(measure, step, state, batch)


def format_parts(parts: dict[str, dict | None], whole: dict) -> str:
    """A text table of `modelled_by_part`: each part's modelled and roofline milliseconds,
    GFLOP and share of the parts' modelled time, then their sums and the whole step's."""
    rows = {k: v for k, v in parts.items() if v is not None}
    total = sum(v["modelled_s"] for v in rows.values()) or 1.0
    head = ("part (modelled, one chip)", "ms", "roofline ms", "GFLOP", "share")
    lines = ["{:<28} {:>9} {:>12} {:>10} {:>7}".format(*head)]
    for name, v in sorted(rows.items(), key=lambda kv: -kv[1]["modelled_s"]):
        lines.append(
            f"{name:<28} {1e3 * v['modelled_s']:9.3f} {1e3 * v['roofline_s']:12.3f} "
            f"{v['flops'] / 1e9:10.2f} {100 * v['modelled_s'] / total:6.1f}%"
        )
    for name, v in (
        ("sum of parts", {k: sum(r[k] for r in rows.values()) for k in whole}),
        ("step (one program)", whole),
    ):
        lines.append(
            f"{name:<28} {1e3 * v['modelled_s']:9.3f} {1e3 * v['roofline_s']:12.3f} "
            f"{v['flops'] / 1e9:10.2f}"
        )
    return "\n".join(lines)


def bench_compile(
    config: ml_collections.ConfigDict,
    topology: str,
    num_classes: int = 0,
    batch: int = 0,
    eval_batch: int = 0,
    by_part: bool = False,
) -> dict[str, Any]:
    """Figures of `config`'s train step and eval forward compiled for `topology` (a name
    `accelerators.target` takes); see the module docstring.

    `num_classes` 0 is the config's data set's count; `batch` 0 is `config.batch_size`,
    `eval_batch` 0 `config.eval_batch_size`. `by_part` (TPU): also print the table of
    `modelled_by_part`.
    """
    target = accelerators.target(topology)
    chip, n = target.chip, target.device_count
    config = ml_collections.ConfigDict(config.to_dict())
    if batch:
        config.batch_size = batch
    eval_batch = eval_batch or config.eval_batch_size
    num_classes = num_classes or registry.get(config.data.name).num_classes or 0
    if num_classes <= 0:
        raise ConfigError(
            f"config.data.name={config.data.name!r} has no fixed class count: give --num_classes"
        )
    result: dict[str, Any] = {
        "device": f"{target.devices[0].device_kind} x {n}",
        "topology": topology,
        "num_classes": num_classes,
        "global_batch": config.batch_size,
        "per_device_batch": config.batch_size // n if config.batch_size % n == 0 else "-",
        "eval_batch": eval_batch,
        "dtype": config.get("dtype", "float32"),
    }
    if by_part and chip.platform != "tpu":
        raise ConfigError(f"--by_part: {topology} has no cost model (TPU topologies have)")
    cache = demo.default_cache_dir() / "compile"
    with tempfile.TemporaryDirectory() as scratch:
        config = stand_in_assets(config, num_classes, pathlib.Path(scratch))
        lowered = lower_programs(config, num_classes, eval_batch, target.devices, chip.platform)
        programs = {
            name: compiled_figures(lowered[name], chip, cache, what)
            for name, what in PROGRAMS.items()
        }
        if "train_flops" in lowered:
            programs["train"]["flops"] = lowered["train_flops"]
        result |= _figures(programs, chip, config.batch_size, eval_batch)
        if by_part:
            try:
                print(format_parts(*modelled_by_part(config, num_classes, target)))
            except OutOfMemory as e:
                print(f"by part: a part does not fit on one chip ({e})")
    return result


def _figures(programs: dict, chip: accelerators.Chip, batch: int, eval_batch: int) -> dict:
    """Compile time, memory per chip, fit, FLOPs, roofline and modelled figures of the
    programs' `compiled_figures`."""
    train, evaluate = programs["train"], programs["eval"]
    result: dict[str, Any] = {
        "compile_s": train["compile_s"] + evaluate["compile_s"],
        "compiled": "cached (an earlier compile of the same programs)"
        if train["cached"] and evaluate["cached"]
        else "now",
    }
    refused = [p["out_of_memory"] for p in (train, evaluate) if "out_of_memory" in p]
    if refused:
        result["hbm_gib"] = chip.hbm_gib
        result["fits"] = f"no ({refused[0]})"
        return result
    result |= {f"train_{k}": v for k, v in train["memory"].items()}
    result |= {f"eval_{k}": v for k, v in evaluate["memory"].items()}
    result["hbm_gib"] = chip.hbm_gib
    if chip.usable_fraction < 1:
        result["usable_gib"] = chip.usable_gib
    peak = max(train["memory"].get("peak_gib", 0.0), evaluate["memory"].get("peak_gib", 0.0))
    fits = peak <= chip.usable_gib
    result["fits"] = "yes" if fits else f"no (needs {peak:.2f} GiB of {chip.usable_gib:.2f})"
    flops = train["flops"]
    result["step_tflops"] = flops / 1e12
    result["roofline_step_s"] = roofline_seconds(train, chip)
    seconds = modelled_step_seconds(train)
    if seconds is not None:
        result["modelled_step_s"] = seconds
        result["modelled_train_images_per_s"] = batch / seconds
        result["modelled_mfu_percent"] = 100 * train["flops"] / seconds / (chip.peak_tflops * 1e12)
        result["modelled_eval_images_per_s"] = eval_batch / modelled_step_seconds(evaluate)
    return result

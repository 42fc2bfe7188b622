"""`python -m mlgraph.bench compile`: configs compiled ahead of time for a TPU slice and NVIDIA
GPUs from this CPU host (libtpu and the CUDA plugin's deviceless compiler, the `aot` extra).

Tiny shapes only: a paper config takes many minutes to compile for a TPU here (README table)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgraph import accelerators, bench_compile, train_state, train_step
from mlgraph.data import registry
from mlgraph.models import layers
from mlgraph.models.backbones import resnet

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_config(name: str, **overrides):
    """configs/NAME.py's config with top-level field overrides."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def small_salgl(**overrides):
    """salgl_demo at 64 px, batch 8: MobileNetV2 (depthwise convolutions), scene attention,
    GGNN."""
    return load_config("salgl_demo", image_size=64, batch_size=8, eval_batch_size=8, **overrides)


@pytest.fixture(scope="module")
def v4_train_step():
    """salgl_demo's train step (64 px, bfloat16) compiled for a v4 slice of 4 chips."""
    target = accelerators.target("v4:2x2x1")
    config = small_salgl(dtype="bfloat16")
    num_classes = registry.get(config.data.name).num_classes
    with _stand_ins(config, num_classes) as config:
        lowered = bench_compile.lower_programs(
            config, num_classes, config.eval_batch_size, target.devices, "tpu"
        )
        with bench_compile.persistent_cache_off_for("tpu"):
            return lowered["train"].compile()


@contextlib.contextmanager
def _stand_ins(config, num_classes):
    """`config` with its asset names made zero-filled files (`bench_compile.stand_in_assets`)."""
    with tempfile.TemporaryDirectory() as scratch:
        yield bench_compile.stand_in_assets(config, num_classes, pathlib.Path(scratch))


def _primitive_dtypes(jaxpr, names: tuple[str, ...], seen: dict) -> dict:
    """{primitive: dtypes of its first operand} over `jaxpr` and every jaxpr nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            seen.setdefault(eqn.primitive.name, set()).add(str(eqn.invars[0].aval.dtype))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitive_dtypes(inner, names, seen)
    return seen


def test_targets_name_their_chips_and_bad_names_list_the_valid_forms():
    for name, count, kind in (
        ("v4:2x2x1", 4, "TPU v4"),
        ("v5e:4x4", 16, "TPU v5 lite"),
        ("v5p:2x2x2", 8, "TPU v5"),
        ("h100:8", 8, "NVIDIA H100 80GB HBM3"),
        ("a100:2x8", 16, "NVIDIA A100-SXM4-80GB"),
    ):
        target = accelerators.target(name)
        assert (target.device_count, target.devices[0].device_kind) == (count, kind)
        assert accelerators.chip_of(kind) is target.chip
    with pytest.raises(accelerators.ConfigError) as e:
        accelerators.parse_target("v9:2x2")
    assert str(e.value) == (
        "--topology 'v9:2x2': expected CHIP:SHAPE with CHIP one of v4, v5e, v5p, v6e, h100, "
        "h200, a100 (e.g. v4:2x2x1, v5e:4x4, v5p:2x2x2, v6e:2x2, h100:8, h200:8, a100:8)"
    )
    with pytest.raises(accelerators.ConfigError, match="h100 takes N or HxN after the colon"):
        accelerators.parse_target("h100:2x2x2")


def test_salgl_demo_compiles_for_a_v4_slice_with_memory_flops_and_a_sound_modelled_time(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLGRAPH_CACHE", str(tmp_path))
    result = bench_compile.bench_compile(small_salgl(), "v4:2x2x1")
    assert result["compiled"] == "now"
    assert result["device"] == "TPU v4 x 4"
    assert (result["global_batch"], result["per_device_batch"]) == (8, 2)
    for key in ("train_arguments_gib", "train_temporaries_gib", "train_peak_gib", "eval_peak_gib"):
        assert result[key] > 0, key
    assert result["hbm_gib"] == 32.0 and result["fits"] == "yes"
    assert result["step_tflops"] > 0
    # The cost model's raw figure is negative here (uncosted ops count -1 s each); corrected,
    # it is positive and near the roofline of the same program (XLA's byte count is not the
    # cost model's, so not above it everywhere: scob_coco's step models 0.9x its roofline).
    assert 0.5 * result["roofline_step_s"] < result["modelled_step_s"]
    assert result["modelled_step_s"] < 3 * result["roofline_step_s"]
    assert result["modelled_train_images_per_s"] == pytest.approx(8 / result["modelled_step_s"])
    assert 0 < result["modelled_mfu_percent"] < 100
    # The same programs again: their figures from the cache, without compiling.
    again = bench_compile.bench_compile(small_salgl(), "v4:2x2x1")
    assert again.pop("compiled") == "cached (an earlier compile of the same programs)"
    assert again == {k: v for k, v in result.items() if k != "compiled"}


def test_compiled_figures_are_kept_per_program_chip_and_compiler(tmp_path):
    target = accelerators.target("v5e:2x2")
    device = jax.sharding.SingleDeviceSharding(target.devices[0])
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=device)
    square = jax.jit(lambda x: x @ x).lower(x)
    first = bench_compile.compiled_figures(square, target.chip, tmp_path)
    assert first["cached"] is False and first["flops"] == 2 * 256**3
    assert bench_compile.compiled_figures(square, target.chip, tmp_path) == first | {"cached": True}
    cube = jax.jit(lambda x: x @ x @ x).lower(x)
    assert bench_compile.compiled_figures(cube, target.chip, tmp_path)["cached"] is False
    # Another chip is another entry, and an unreadable entry is compiled again.
    assert (
        bench_compile.compiled_figures(square, accelerators.CHIPS["v4"], tmp_path)["cached"]
        is False
    )
    for entry in tmp_path.iterdir():
        entry.write_text("{")
    assert bench_compile.compiled_figures(square, target.chip, tmp_path)["cached"] is False


def test_baseline_demo_compiles_for_one_h100_without_a_cost_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLGRAPH_CACHE", str(tmp_path))
    result = bench_compile.bench_compile(
        load_config("baseline_demo"), "h100:1", batch=8, eval_batch=8
    )
    assert result["device"] == "NVIDIA H100 80GB HBM3 x 1"
    assert result["per_device_batch"] == 8
    assert result["train_peak_gib"] > 0 and result["eval_peak_gib"] > 0
    assert result["usable_gib"] == pytest.approx(0.75 * result["hbm_gib"])
    assert result["fits"] == "yes" and result["step_tflops"] > 0
    assert result["roofline_step_s"] > 0
    assert not any(k.startswith("modelled") for k in result)


@pytest.mark.parametrize(
    "config, topology", [("baseline_demo", "v4:2x2x1"), ("salgl_demo", "h100:1")]
)
def test_the_other_small_config_compiles_for_each_target(config, topology, tmp_path, monkeypatch):
    monkeypatch.setenv("MLGRAPH_CACHE", str(tmp_path))
    result = bench_compile.bench_compile(
        load_config(config, image_size=64), topology, batch=8, eval_batch=8
    )
    devices = accelerators.target(topology).device_count
    assert result["per_device_batch"] == 8 // devices
    assert result["train_peak_gib"] > 0 and result["eval_peak_gib"] > 0
    assert result["step_tflops"] > 0 and result["fits"] == "yes"


def test_the_tpu_programs_take_the_accelerator_branches_and_compute_in_bfloat16(v4_train_step):
    text = v4_train_step.as_text()
    # No CPU-only custom call or host callback, no `materialize_on_cpu` conditional.
    targets = set(re.findall(r'custom_call_target="([^"]+)"', text))
    assert not {t for t in targets if "cpu" in t.lower() or "callback" in t.lower()}, targets
    assert " conditional(" not in text
    # MobileNetV2's depthwise convolutions are grouped convolutions, not shifted sums.
    assert "feature_group_count=" in text
    # The model's convolutions run in bf16 (XLA also makes some float32 einsums convolutions).
    convolutions = re.findall(
        r"= (\w+)\[[^\]]*\]\S* convolution\(.*op_name=\"[^\"]*conv_general_dilated\"", text
    )
    assert len(convolutions) >= 40 and set(convolutions) == {"bf16"}, set(convolutions)


def test_bfloat16_keeps_parameters_optimizer_state_loss_and_softmax_in_float32():
    config = small_salgl(dtype="bfloat16")
    num_classes = registry.get(config.data.name).num_classes
    with _stand_ins(config, num_classes) as config:
        training = bench_compile.synthetic_training(8, num_classes)
        with layers.compiling_for("tpu"):
            mod, graphdef, tx, state = train_state.abstract_train_state(
                config, num_classes, 1000, training
            )
            step = train_step.make_train_step(mod, graphdef, tx, config, 1000)
            batch = bench_compile.abstract_batch(8, 64, num_classes)
            jaxpr = jax.make_jaxpr(step)(state, batch)
            _, metrics = jax.eval_shape(step, state, batch)
    for part in ("params", "opt", "ema"):
        dtypes = {
            x.dtype for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)
        }
        assert dtypes == {jnp.dtype(jnp.float32)}, (part, dtypes)
    assert metrics["loss"].dtype == jnp.float32
    seen = _primitive_dtypes(jaxpr.jaxpr, ("conv_general_dilated", "exp", "reduce_max"), {})
    assert seen["conv_general_dilated"] == {"bfloat16"}
    assert seen["exp"] == {"float32"} and seen["reduce_max"] == {"float32"}, seen


def test_an_impossible_batch_prints_fits_no_and_exits_0(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "mlgraph.bench", "compile",
            "--config", "configs/salgl_demo.py", "--topology", "v5e:2x2",
            "--config.image_size=64", "--batch", "262144", "--eval_batch", "8",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MLGRAPH_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    fits = [line for line in proc.stdout.splitlines() if line.startswith("fits: ")]
    assert len(fits) == 1 and re.fullmatch(r"fits: no \(needs [\d.]+ GiB of 1[56]\.\d+\)", fits[0])


def test_the_abstract_state_is_the_initialised_state_in_shapes_and_dtypes():
    config = small_salgl(init_from="")
    num_classes = registry.get(config.data.name).num_classes
    with _stand_ins(config, num_classes) as config:
        training = bench_compile.synthetic_training(8, num_classes)
        *_, real = train_state.init_train_state(config, num_classes, 100, training)
        *_, abstract = train_state.abstract_train_state(config, num_classes, 100, training)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]  # noqa: E731
    assert shapes(real) == shapes(abstract)


def test_resnet_blocks_keep_their_cpu_rewrites_on_cpu_only():
    """The same bottleneck's gradient: traced for the CPU, `materialize_on_cpu`'s conditional
    and the weight gradient as per-position matmuls; compiled for a TPU, neither."""
    block = resnet.Bottleneck(64, 16, stride=1, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def loss(params, x):
        return nnx.merge(graphdef, params, rest)(x).astype(jnp.float32).sum()

    x = np.zeros((2, 8, 8, 64), np.float32)
    cpu = jax.jit(jax.grad(loss)).lower(params, x).as_text()
    assert "stablehlo.case" in cpu or "stablehlo.if" in cpu
    target = accelerators.target("v4:2x2x1")
    device = jax.sharding.SingleDeviceSharding(target.devices[0])
    put = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=device), t
    )
    with layers.compiling_for("tpu"):
        compiled = jax.jit(jax.grad(loss)).lower(put(params), put(x)).compile().as_text()
    assert " conditional(" not in compiled
    # Three convolutions forward, and for each its input and its weight gradient (less the
    # first one's input gradient, which nothing reads): 8 convolutions, no per-position dots.
    assert len(re.findall(r" convolution\(", compiled)) >= 8


def test_cpu_runs_print_no_tpu_or_cuda_start_up_lines_with_the_aot_extra(tmp_path):
    assert importlib.util.find_spec("libtpu") is not None, "the aot extra is not installed"
    assert importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    # As a user starts it: no JAX_PLATFORMS, one CPU device.
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run(
        [
            sys.executable, "-m", "mlgraph.main", "--config", "configs/baseline_demo.py",
            "--workdir", str(tmp_path / "run"), "--config.num_epochs=1",
            "--config.stop_at_step=1",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for text in ("cuda", "CUDA", "TPU", "libtpu", "absl::InitializeLog", "plugin"):
        assert text not in output, (text, output[:3000])


def test_jax_starts_the_cpu_backend_alone_only_where_nothing_else_could_start(monkeypatch):
    from mlgraph import platforms

    monkeypatch.setattr(platforms, "has_accelerator", lambda: False)
    environ = {}
    assert platforms.choose_platforms(environ) == "cpu" and environ == {"JAX_PLATFORMS": "cpu"}
    environ = {"JAX_PLATFORMS": "cuda"}
    assert platforms.choose_platforms(environ) is None and environ == {"JAX_PLATFORMS": "cuda"}
    monkeypatch.setattr(platforms, "has_accelerator", lambda: True)
    environ = {}
    assert platforms.choose_platforms(environ) is None and environ == {}
    assert platforms.is_start_up_line(
        "I0000 00:00:1796616021.255497   24179 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.\n"
    )
    assert not platforms.is_start_up_line("error: config.batch_size=-8: must be positive\n")


def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_figures(tmp_path, capsys):
    target = accelerators.target("v5e:2x2")
    device = jax.sharding.SingleDeviceSharding(target.devices[0])
    x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=device)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    figures = bench_compile.compiled_figures(jax.jit(jnp.sin).lower(x), target.chip, blocked)
    assert figures["cached"] is False and figures["memory"]["peak_gib"] > 0
    assert capsys.readouterr().err.startswith(
        f"warning: cannot keep the compile's figures in {blocked} (File exists)"
    )

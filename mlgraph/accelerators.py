"""The accelerators mlgraph compiles for: each chip's vendor figures, and a target's devices
without the chip (`python -m mlgraph.bench compile --topology T`, `mlgraph.bench_compile`).

A target is a TPU slice, `KIND:TOPOLOGY` as Cloud TPU names them (`v4:2x2x1`, `v5e:4x4`,
`v5p:2x2x2`, `v6e:2x2`, pods such as `v5e:16x16`), or NVIDIA GPUs, `KIND:N` (N on one host) or
`KIND:HxN` (H hosts of N): `h100:8`, `h200:8`, `a100:8`. Its devices are compile-only: XLA's
TPU compiler in libtpu (`jax.experimental.topologies.get_topology_desc`) or the CUDA PJRT
plugin's deviceless compiler given a `GpuTargetConfig` of the card (`gpu_target_config`); both
come with the `aot` extra (`pip install 'mlgraph[aot]'`) and run on a CPU host.

Figures per chip, from the vendors' data sheets: Cloud TPU's system architecture pages (v4,
v5e, v5p, v6e: bf16 peak, HBM size and bandwidth) and NVIDIA's H100, H200 and A100 data
sheets (SXM parts: dense bf16 tensor-core peak without sparsity, memory, bandwidth, SM count,
boost clock). The GPU target configs were checked field by field against the cards' specs that
XLA's own tests compile for (XLA's `xla/backends/gpu/target_config/specs/*.txtpb`).
"""

from __future__ import annotations

import dataclasses
import os
import re

from mlgraph.errors import ConfigError

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class GpuCard:
    """What XLA's GPU compiler needs to know of an NVIDIA card (a `GpuTargetConfig`)."""

    device_name: str  # as CUDA reports it (`device_kind`)
    sm_count: int
    clock_ghz: float  # boost clock
    memory_bytes: int  # device memory CUDA reports
    compute_capability: tuple[int, int]
    shared_memory_per_sm: int
    l2_cache_bytes: int


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (a TPU chip, megacore where it has two TensorCores, or a GPU)."""

    name: str  # as in a target's name: 'v5e', 'h100'
    platform: str  # 'tpu' or 'gpu'
    device_kind: str  # lower-case substring of JAX's `device_kind`
    hbm_gib: float
    peak_tflops: float  # dense bf16 per chip
    hbm_gb_per_s: float
    # Share of the memory a JAX program may use: on GPUs JAX preallocates 75 % by default
    # (XLA_PYTHON_CLIENT_MEM_FRACTION), and a program needing more fails to allocate.
    usable_fraction: float = 1.0
    gpu: GpuCard | None = None

    @property
    def usable_gib(self) -> float:
        """Memory a program may use on one chip, GiB."""
        return self.hbm_gib * self.usable_fraction


CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        Chip("v4", "tpu", "tpu v4", 32.0, 275.0, 1228.0),
        Chip("v5e", "tpu", "tpu v5 lite", 16.0, 197.0, 819.0),
        Chip("v5p", "tpu", "tpu v5", 95.0, 459.0, 2765.0),
        Chip("v6e", "tpu", "tpu v6 lite", 32.0, 918.0, 1640.0),
        Chip(
            "h100",
            "gpu",
            "h100",
            84942979072 / GIB,
            989.0,
            3352.0,
            0.75,
            GpuCard("NVIDIA H100 80GB HBM3", 132, 1.98, 84942979072, (9, 0), 233472, 52428800),
        ),
        Chip(
            "h200",
            "gpu",
            "h200",
            151397597184 / GIB,
            989.0,
            4800.0,
            0.75,
            GpuCard("NVIDIA H200 141GB HBM3e", 132, 1.98, 151397597184, (9, 0), 233472, 52428800),
        ),
        Chip(
            "a100",
            "gpu",
            "a100",
            85100068864 / GIB,
            312.0,
            2039.0,
            0.75,
            GpuCard("NVIDIA A100-SXM4-80GB", 108, 1.41, 85100068864, (8, 0), 167936, 41943040),
        ),
    )  # fmt: skip
}


def chip_of(device_kind: str) -> Chip | None:
    """The chip a JAX `device_kind` names ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), if known.

    The longest match wins, so 'TPU v5 lite' is v5e, not v5p ('tpu v5').
    """
    kind = device_kind.lower()
    matches = [c for c in CHIPS.values() if c.device_kind in kind]
    return max(matches, key=lambda c: len(c.device_kind), default=None)


def peak_tflops_of(device_kind: str) -> float:
    """Dense bf16 peak TFLOP/s of one device of this kind, 0 if the chip is unknown."""
    chip = chip_of(device_kind)
    return chip.peak_tflops if chip else 0.0


def gpu_target_config(chip: Chip) -> str:
    """The `GpuTargetConfig` text proto of a GPU chip, for the CUDA plugin's deviceless
    compile.

    Only fields every jaxlib since 0.9 knows (an unknown field fails to parse); the compiler
    reads the SM count, clock, memory, compute capability and the cuDNN version (which picks
    the fused-attention and convolution kernels) from it.
    """
    card = chip.gpu
    major, minor = card.compute_capability
    # Hopper's architecture-specific features (sm_90a: wgmma, TMA), as CUDA reports them.
    extension = " feature_extension: ACCELERATED_FEATURES" if major == 9 else ""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {card.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {card.sm_count}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_gb_per_s * 1e9)}
  l2_cache_size: {card.l2_cache_bytes}
  clock_rate_ghz: {card.clock_ghz}
  device_memory_size: {card.memory_bytes}
  shared_memory_per_block_optin: {card.shared_memory_per_sm - 1024}
  cuda_compute_capability {{ major: {major} minor: {minor}{extension} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{card.device_name}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or host of accelerators to compile for, and its compile-only devices."""

    name: str
    chip: Chip
    devices: tuple  # jax devices, compile-only

    @property
    def device_count(self) -> int:
        """Number of devices (chips) in the target."""
        return len(self.devices)


_TPU_SHAPE = re.compile(r"^\d+x\d+(x\d+)?$")
_GPU_SHAPE = re.compile(r"^(?:(\d+)x)?(\d+)$")
EXAMPLES = "v4:2x2x1, v5e:4x4, v5p:2x2x2, v6e:2x2, h100:8, h200:8, a100:8"
AOT_EXTRA = "pip install 'mlgraph[aot]'"


def parse_target(name: str) -> tuple[Chip, str]:
    """(chip, shape) of a target name such as 'v5e:4x4' or 'h100:8'.

    Raises:
      ConfigError: an unknown chip or a malformed shape, naming the valid forms.
    """
    kind, _, shape = name.partition(":")
    chip = CHIPS.get(kind.lower())
    if chip is None or not shape:
        raise ConfigError(
            f"--topology {name!r}: expected CHIP:SHAPE with CHIP one of {', '.join(CHIPS)} "
            f"(e.g. {EXAMPLES})"
        )
    pattern = _TPU_SHAPE if chip.platform == "tpu" else _GPU_SHAPE
    if not pattern.match(shape):
        form = "a slice shape such as 2x2 or 2x2x1" if chip.platform == "tpu" else "N or HxN"
        raise ConfigError(f"--topology {name!r}: {chip.name} takes {form} after the colon")
    return chip, shape


def target(name: str) -> Target:
    """The compile-only devices of a target (see the module docstring).

    Raises:
      ConfigError: a bad name, or the compiler for its platform is not installed.
    """
    chip, shape = parse_target(name)
    from jax.experimental import topologies

    if chip.platform == "tpu":
        _quiet_libtpu()
        # v4 and v5p chips hold two TensorCores that JAX drives as one device (megacore).
        options = {"chip_config_name": "megacore"} if chip.name == "v4" else {}
        try:
            topology = topologies.get_topology_desc(
                topology_name=f"{chip.name}:{shape}", platform="tpu", **options
            )
        except Exception as e:  # noqa: BLE001 - libtpu's errors have no common type
            raise _compiler_problem(name, "libtpu", e) from None
    else:
        hosts, per_host = _GPU_SHAPE.match(shape).groups()
        try:
            topology = topologies.get_topology_desc(
                platform="cuda",
                target_config=gpu_target_config(chip),
                topology=f"1x{hosts or 1}x{per_host}",
            )
        except Exception as e:  # noqa: BLE001 - the plugin's errors have no common type
            raise _compiler_problem(name, "the CUDA plugin (jax-cuda12-pjrt)", e) from None
    return Target(name, chip, tuple(topology.devices))


def _compiler_problem(name: str, compiler: str, error: Exception) -> ConfigError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    missing = any(s in first for s in ("not found", "Unknown backend", "No such file", "plugin"))
    hint = f"; install it with {AOT_EXTRA}" if missing else ""
    if "not implemented for cuda" in first:
        # The plugin is installed but did not register: its CUDA version checks ran (JAX was
        # started without JAX_PLATFORMS=cpu on a host with no GPU) and failed.
        hint = (
            "; the CUDA plugin did not register: on a host without a GPU, start Python with "
            f"JAX_PLATFORMS=cpu (mlgraph sets it when imported before JAX), or {AOT_EXTRA}"
        )
    return ConfigError(f"--topology {name}: {compiler} cannot describe it ({first}){hint}")


def _quiet_libtpu() -> None:
    """Tell libtpu it runs on no TPU VM, so that loading it for a compile-only topology does
    not look for the VM's metadata server and print a page of warnings about it, and that
    other processes may load it too (its lock file guards a chip, and there is none here)."""
    for key, value in (
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", "v4-8"),
    ):
        os.environ.setdefault(key, value)

"""Which JAX backends a run starts, decided before JAX starts any, and a quiet start.

With the `aot` extra installed (libtpu and the CUDA plugin, for `bench compile`) on a host with
no TPU and no GPU, a plain JAX start tries both accelerators and prints their failures on every
command: libtpu's metadata-server warnings, the CUDA plugin's version-check traceback, and the
CUDA runtime stub's 'Could not find cuda drivers' lines from each plugin library loaded. So:

* `choose_platforms`: where the user has not set `JAX_PLATFORMS` and the host has no
  accelerator device files, JAX starts the CPU backend only (nothing else could start);
* `import_jax_quietly`: JAX is imported, and its PJRT plugins registered, with the process's
  standard error caught at the file-descriptor level (the lines come from C++); every line but
  the known start-up ones above is written back.

Hosts with an accelerator, and any `JAX_PLATFORMS` the user set, are left to JAX.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
from collections.abc import MutableMapping

# Device files of the accelerators JAX drives: TPU v2-v4 (/dev/accel*), TPU v5e and later
# (/dev/vfio/N), NVIDIA GPUs, AMD GPUs.
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
# Lines the accelerator libraries print when loaded on a host without their device.
START_UP_LINES = (
    "Could not find cuda drivers on your machine",
    "All log messages before absl::InitializeLog() is called are written to STDERR",
)


def has_accelerator() -> bool:
    """Whether this host has a TPU or GPU device file."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def choose_platforms(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set `JAX_PLATFORMS=cpu` in `environ` (default `os.environ`) where it is unset and the
    host has no accelerator; returns the value set, or None where it was left alone."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_PLATFORMS") or has_accelerator():
        return None
    environ["JAX_PLATFORMS"] = "cpu"
    return "cpu"


def is_start_up_line(line: str) -> bool:
    """Whether `line` is one of the accelerator libraries' start-up lines (START_UP_LINES)."""
    return any(text in line for text in START_UP_LINES)


def import_jax_quietly() -> None:
    """Import JAX and register its PJRT plugins, dropping the accelerator libraries' start-up
    lines from standard error when only the CPU backend will start (`JAX_PLATFORMS=cpu`).

    Registering a plugin loads its library (where the CUDA stub prints) but starts no backend,
    so `jax.distributed.initialize` may still come after.
    """
    if "jax" in sys.modules or os.environ.get("JAX_PLATFORMS", "").strip() != "cpu":
        import jax  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import jax  # noqa: F401
            import jax._src.xla_bridge as xla_bridge  # no public API registers plugins alone

            xla_bridge._discover_and_register_pjrt_plugins()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not is_start_up_line(line)))
            sys.stderr.flush()

"""The XLA:CPU option mlgraph sets before JAX starts its backends: YNNPACK fusions for matrix
products and reductions, and none for elementwise ops.

Why: timed on CPU in float32, with each ResNet block's output kept in memory
(`layers.materialize_on_cpu`), this option against XLA's default fusions makes the R101
trunk's train step and eval forward and MobileNetV2's train step faster, and ViT-B/16's train
step the same within noise (`python -m mlgraph.bench train` times a config's step). YNNPACK's
elementwise fusions as well (`LIBRARY_FUSION_TYPE_ELTWISE`) are slower and multiply XLA's
temporaries (SALGL's eval at 448 px, batch 128, by an order of magnitude). Other backends ignore
`xla_cpu_*` options.

XLA reads `XLA_FLAGS` once, when JAX initialises its first backend, and aborts the process on
an option it does not know. So the option is added only for the jaxlib versions it was checked
on, only while no backend is running, and never over a value the user put in `XLA_FLAGS`.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import MutableMapping

OPTION = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# jaxlib releases whose XLA knows OPTION and VALUE (an unknown option aborts the process).
CHECKED_JAXLIB = ("0.10.2",)


def _backends_running() -> bool:
    import jax._src.xla_bridge as xla_bridge  # no public API says whether backends started

    return xla_bridge.backends_are_initialized()


def apply_cpu_fusion_option(
    environ: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None
) -> bool:
    """Add `OPTION=VALUE` to `XLA_FLAGS` in `environ` (default `os.environ`).

    Returns True if the option is in effect for the next backend JAX starts: added now, or
    already in `XLA_FLAGS` (the user's value is kept). Warns, and returns False, when it
    cannot be added: the installed jaxlib is not one it was checked on, or JAX's backends
    are already running (XLA has read its flags; import mlgraph before running JAX code).
    """
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if OPTION in flags:
        return True
    version = jaxlib_version or importlib.metadata.version("jaxlib")
    if version not in CHECKED_JAXLIB:
        warnings.warn(
            f"mlgraph: not setting XLA_FLAGS {OPTION}={VALUE}: it was checked on jaxlib "
            f"{', '.join(CHECKED_JAXLIB)}, and jaxlib {version} is installed (XLA aborts on an "
            "option it does not know). CPU steps run up to 1.4x slower without it; add it to "
            "XLA_FLAGS yourself if your jaxlib knows it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if _backends_running():
        warnings.warn(
            f"mlgraph: JAX's backends started before mlgraph was imported, so XLA_FLAGS "
            f"{OPTION}={VALUE} cannot take effect in this process; CPU steps run up to 1.4x "
            "slower without it. Import mlgraph before running JAX code, or set it in XLA_FLAGS "
            "before starting Python.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    environ["XLA_FLAGS"] = f"{flags} {OPTION}={VALUE}".strip()
    return True

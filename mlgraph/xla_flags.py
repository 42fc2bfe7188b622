"""The XLA:CPU option mlgraph sets before JAX starts its backends: YNNPACK fusions for
elementwise ops and reductions as well as for matrix products.

Why: with XLA:CPU's default fusions the residual stream of a ResNet stage is never kept. Each
block's output `relu(bn3(conv3) + x)` is an elementwise op, which the fusion pass copies into
every consumer instead of reading once, so block k recomputes the outputs of all the blocks
before it in its stage, in the forward and again inside each weight gradient's transpose.
R101 layer3 (23 blocks) then costs quadratic time: at 224 px, batch 8, 2 threads, a train
fwd+bwd of the R101 trunk took 5.3 s, 74 % of it in those fusions, against 1.6 s for PyTorch.
With YNNPACK also taking elementwise ops and reductions, the stream is materialised and the
same step takes 2.1 s (`python -m mlgraph.bench train ... --against torch` gives the model's
figures). Other backends ignore `xla_cpu_*` options.

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
VALUE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
# jaxlib releases whose XLA knows OPTION and VALUE (an unknown option aborts the process).
CHECKED_JAXLIB = ("0.10.2",)


def _backends_running() -> bool:
    import jax._src.xla_bridge as xla_bridge  # no public API says whether backends started

    return xla_bridge.backends_are_initialized()


def apply_cpu_fusion_flag(
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
            "option it does not know). Residual networks train up to 2.5x slower on CPU "
            "without it; add it to XLA_FLAGS yourself if your jaxlib knows it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if _backends_running():
        warnings.warn(
            f"mlgraph: JAX's backends started before mlgraph was imported, so XLA_FLAGS "
            f"{OPTION}={VALUE} cannot take effect in this process; residual networks train up "
            "to 2.5x slower on CPU without it. Import mlgraph before running JAX code, or set "
            "it in XLA_FLAGS before starting Python.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    environ["XLA_FLAGS"] = f"{flags} {OPTION}={VALUE}".strip()
    return True

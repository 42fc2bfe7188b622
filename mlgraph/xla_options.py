"""The XLA:CPU compiler option of mlgraph's train steps: YNNPACK fusions for elementwise ops and
reductions as well as for matrix products.

Why: with XLA:CPU's default fusions the residual stream of a ResNet stage is never kept. Each
block's output `relu(bn3(conv3) + x)` is an elementwise op, which the fusion pass copies into
every consumer instead of reading once, so block k recomputes the outputs of all the blocks
before it in its stage, in the forward and again inside each weight gradient's transpose.
R101's layer3 (23 blocks) then costs quadratic time: at 224 px, batch 8, 2 threads, a train
fwd+bwd of the R101 trunk took 5.3 s, 74 % of it in those fusions, against 1.6 s for PyTorch;
with this option, 2.1 s. (`jax.lax.optimization_barrier` cannot stop it: XLA:CPU removes
barriers before fusing.)

Only train steps take it, per `jax.jit(..., compiler_options=...)`: the eval forward of the
same trunk is slower with it (0.71 s against 0.50 s), and a step's temporaries grow (SALGL at
224 px, batch 8: 1.6 -> 3.0 GiB). Other backends ignore `xla_cpu_*` options.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Mapping

OPTION = "xla_cpu_experimental_ynn_fusion_type"
VALUE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
# jaxlib releases whose XLA knows OPTION and VALUE (another one fails the compile on it).
CHECKED_JAXLIB = ("0.10.2",)


def train_step_options(
    environ: Mapping[str, str] | None = None, jaxlib_version: str | None = None
) -> dict[str, str]:
    """The `compiler_options` for `jax.jit` of a train step: `{OPTION: VALUE}`.

    Empty when `XLA_FLAGS` in `environ` (default `os.environ`) already sets OPTION: the user's
    value stands (`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT` gives XLA's
    default fusions back). Empty, with a warning, when the installed jaxlib is not one the
    option was checked on.
    """
    environ = os.environ if environ is None else environ
    if OPTION in environ.get("XLA_FLAGS", ""):
        return {}
    version = jaxlib_version or importlib.metadata.version("jaxlib")
    if version not in CHECKED_JAXLIB:
        warnings.warn(
            f"mlgraph: train steps compile without the XLA option {OPTION}={VALUE}: it was "
            f"checked on jaxlib {', '.join(CHECKED_JAXLIB)}, and jaxlib {version} is installed. "
            "Residual networks train up to 2.5x slower on CPU without it; set "
            f"XLA_FLAGS=--{OPTION}={VALUE} if your jaxlib knows it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return {}
    return {OPTION: VALUE}

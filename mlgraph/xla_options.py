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

Only train steps that differentiate through a ResNet's layer3 take it, per
`jax.jit(..., compiler_options=...)`: elsewhere the option is slower. Train fwd+bwd on 2 CPU
cores, 224 px, default -> with the option: R101 trunk, batch 8, 5.3 -> 2.1 s; R50, batch 8,
2.25 -> 1.34 s (1.29 s with frozen batch norm); ViT-B/16, batch 4, 1.78 -> 2.21 s;
MobileNetV2, batch 4, 0.37 -> 0.56 s; an R101 forward alone (eval, or a frozen backbone),
0.50 -> 0.71 s. A step's temporaries grow with it (SALGL at 224 px, batch 8: 1.6 -> 3.0 GiB).
Other backends ignore `xla_cpu_*` options.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from collections.abc import Mapping

import ml_collections
from flax import nnx

from mlgraph import optim

OPTION = "xla_cpu_experimental_ynn_fusion_type"
VALUE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
# jaxlib releases whose XLA knows OPTION and VALUE (another one fails the compile on it).
CHECKED_JAXLIB = ("0.10.2",)


# A trained ResNet layer3 block: its parameter path ends in layer3/<block>/conv1/kernel.
RESNET_LAYER3 = re.compile(r"(.+/)?layer3/\d+/conv1/kernel")


def train_step_options(
    params: nnx.State,
    opt: ml_collections.ConfigDict,
    environ: Mapping[str, str] | None = None,
    jaxlib_version: str | None = None,
) -> dict[str, str]:
    """The `compiler_options` for `jax.jit` of a train step of a model with parameters `params`
    trained by `opt` (its `frozen` regexes): `{OPTION: VALUE}` when a parameter that is trained
    is a ResNet layer3 block's (`RESNET_LAYER3`), otherwise empty.

    Empty too when `XLA_FLAGS` in `environ` (default `os.environ`) already sets OPTION: the
    user's value stands (`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT` gives
    XLA's default fusions back). Empty, with a warning, when the installed jaxlib is not one the
    option was checked on.
    """
    trained = optim.split_frozen(params, opt)[1]
    names = ("/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(trained))
    if not any(RESNET_LAYER3.fullmatch(n) for n in names):
        return {}
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

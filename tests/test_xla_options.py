"""The XLA:CPU compiler option of train steps: which steps get it, when it is withheld, and
that it stops XLA recomputing a ResNet stage's residual stream in every block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from mlgraph import xla_options
from mlgraph.models.backbones import resnet, vit

FLAG = f"--{xla_options.OPTION}={xla_options.VALUE}"


def _params(**kw) -> nnx.State:
    m = resnet.create(image_size=64, layers=(1, 1, 2, 1), width=8, rngs=nnx.Rngs(0), **kw)
    return nnx.state(m, nnx.Param)


def _opt(*frozen: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"frozen": frozen, "lr_mults": ()})


OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
    )
}


def test_a_step_that_trains_a_resnet_layer3_gets_the_option():
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    got = xla_options.train_step_options(_params(), _opt(), env, jaxlib_version="0.10.2")
    assert got == OPTIONS
    # Under a method's attribute, with the stem and layer1-2 frozen: layer3 still trains.
    params = nnx.State({"backbone": _params()})
    opt = _opt("backbone/(conv1|bn1|layer1|layer2)/.*")
    assert xla_options.train_step_options(params, opt, env, jaxlib_version="0.10.2") == OPTIONS


def test_no_option_where_no_resnet_layer3_trains():
    env = {}
    params = nnx.State({"backbone": _params()})
    # Frozen up to layer3 (SALGL's 'part' mode trains layer4 only), or the whole backbone.
    for frozen in ("backbone/(conv1|bn1|layer1|layer2|layer3)/.*", "backbone/.*"):
        assert xla_options.train_step_options(params, _opt(frozen), env, "0.10.2") == {}
    vit_params = nnx.state(
        vit.create(image_size=32, variant=None, width=16, depth=2, num_heads=2, patch_size=16,
                   rngs=nnx.Rngs(0)),
        nnx.Param,
    )  # fmt: skip
    assert xla_options.train_step_options(vit_params, _opt(), env, "0.10.2") == {}


def test_a_value_the_user_set_in_xla_flags_stands():
    env = {"XLA_FLAGS": f"--{xla_options.OPTION}=LIBRARY_FUSION_TYPE_DOT"}
    assert xla_options.train_step_options(_params(), _opt(), env, jaxlib_version="0.10.2") == {}


def test_an_unchecked_jaxlib_gets_a_warning_and_no_option():
    with pytest.warns(RuntimeWarning) as caught:
        assert xla_options.train_step_options(_params(), _opt(), {}, "0.99.0") == {}
    (ours,) = [w for w in caught if w.category is RuntimeWarning]
    assert str(ours.message) == (
        f"mlgraph: train steps compile without the XLA option {FLAG[2:]}: it was checked on "
        "jaxlib 0.10.2, and jaxlib 0.99.0 is installed. Residual networks train up to 2.5x "
        f"slower on CPU without it; set XLA_FLAGS={FLAG} if your jaxlib knows it."
    )


def _largest_fusions(compiler_options: dict[str, str]) -> list[int]:
    """Operand counts of the two largest fusions in the compiled train gradient of a ResNet
    with a stage of 8 identity blocks, at about the smallest sizes where XLA:CPU takes its
    YNNPACK fusions."""
    m = resnet.create(image_size=64, layers=(1, 1, 8, 1), width=16, rngs=nnx.Rngs(0))
    gdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(p, r, x):
        return jnp.mean(nnx.merge(gdef, p, r, copy=True)(x, train=True) ** 2)

    grad = jax.jit(jax.grad(loss), compiler_options=compiler_options)
    hlo = grad.lower(params, rest, jnp.ones((2, 64, 64, 3))).compile().as_text()
    ops = [
        line.split(" fusion(", 1)[1].split("), kind")[0].count("%")
        for line in hlo.splitlines()
        if " fusion(" in line
    ]
    return sorted(ops)[-2:]


def test_the_option_stops_xla_recomputing_the_residual_stream():
    # XLA:CPU's default (YNNPACK for dots only) copies each block's output into every
    # consumer, so its fusions grow with depth: block k's reads the conv outputs and batch-norm
    # parameters of all the blocks before it (about 5 operands a block). The largest fusion
    # (49 operands) is not on the stream and is the same either way.
    default = _largest_fusions({xla_options.OPTION: "LIBRARY_FUSION_TYPE_DOT"})
    assert default[0] >= 40, default
    assert _largest_fusions(OPTIONS)[0] <= 16

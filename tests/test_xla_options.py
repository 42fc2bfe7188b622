"""The XLA:CPU compiler option of train steps: which steps get it and when it is withheld."""

from __future__ import annotations

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

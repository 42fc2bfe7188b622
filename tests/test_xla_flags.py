"""The XLA:CPU fusion option mlgraph sets on import: what it adds to XLA_FLAGS, when it refuses,
and that it stops XLA recomputing a ResNet stage's residual stream in every block."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlgraph import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
FLAG = f"{xla_flags.OPTION}={xla_flags.VALUE}"


def test_importing_mlgraph_put_the_option_in_this_process_xla_flags():
    assert FLAG in os.environ["XLA_FLAGS"].split()


@pytest.fixture
def no_backends(monkeypatch):
    """As before JAX's first computation (the test process has run some by now)."""
    monkeypatch.setattr(xla_flags, "_backends_running", lambda: False)


def test_the_option_is_appended_to_the_flags_already_set(no_backends):
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert xla_flags.apply_cpu_fusion_flag(env, jaxlib_version="0.10.2")
    assert env == {"XLA_FLAGS": f"--xla_backend_optimization_level=0 {FLAG}"}
    env = {}
    assert xla_flags.apply_cpu_fusion_flag(env, jaxlib_version="0.10.2")
    assert env == {"XLA_FLAGS": FLAG}


def test_a_value_the_user_set_is_kept(no_backends):
    mine = f"{xla_flags.OPTION}=LIBRARY_FUSION_TYPE_DOT"
    env = {"XLA_FLAGS": mine}
    assert xla_flags.apply_cpu_fusion_flag(env, jaxlib_version="0.10.2")
    assert env == {"XLA_FLAGS": mine}


def test_an_unchecked_jaxlib_gets_a_warning_and_no_option(no_backends):
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    with pytest.warns(RuntimeWarning) as caught:
        assert not xla_flags.apply_cpu_fusion_flag(env, jaxlib_version="0.99.0")
    assert env == {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert str(caught[0].message) == (
        f"mlgraph: not setting XLA_FLAGS {FLAG}: it was checked on jaxlib 0.10.2, and jaxlib "
        "0.99.0 is installed (XLA aborts on an option it does not know). Residual networks "
        "train up to 2.5x slower on CPU without it; add it to XLA_FLAGS yourself if your "
        "jaxlib knows it."
    )


def test_running_backends_get_a_warning_that_the_option_cannot_take_effect(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backends_running", lambda: True)
    env = {}
    with pytest.warns(RuntimeWarning, match="JAX's backends started before mlgraph was imported"):
        assert not xla_flags.apply_cpu_fusion_flag(env, jaxlib_version="0.10.2")
    assert env == {}


# A ResNet stage of 8 identity blocks, at the smallest sizes where XLA:CPU takes its YNNPACK
# fusions; prints the operand counts of the compiled train gradient's two largest fusions.
_STAGE = """
import jax, jax.numpy as jnp
from flax import nnx
from mlgraph.models.backbones import resnet
m = resnet.create(image_size=64, layers=(1, 1, 8, 1), width=16, rngs=nnx.Rngs(0))
gdef, params, rest = nnx.split(m, nnx.Param, ...)
loss = lambda p, r, x: jnp.mean(nnx.merge(gdef, p, r, copy=True)(x, train=True) ** 2)
hlo = jax.jit(jax.grad(loss)).lower(params, rest, jnp.ones((2, 64, 64, 3))).compile().as_text()
ops = [l.split(" fusion(", 1)[1].split("), kind")[0].count("%")
       for l in hlo.splitlines() if " fusion(" in l]
print(*sorted(ops)[-2:])
"""


def _largest_fusions(xla_flags_value: str) -> list[int]:
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE],
        cwd=os.path.dirname(HERE),
        env=dict(
            os.environ,
            XLA_FLAGS=f"--xla_backend_optimization_level=0 {xla_flags_value}",
            JAX_NUM_CPU_DEVICES="1",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(n) for n in proc.stdout.split()]


def test_the_option_stops_xla_recomputing_the_residual_stream():
    # XLA:CPU's default (YNNPACK for dots only) copies each block's output into every
    # consumer, so the fusions grow with depth: block k's reads the conv outputs and batch-norm
    # parameters of all k blocks before it (about 5 operands a block). The largest (49
    # operands) is not on the stream and is the same with either value.
    default = _largest_fusions(f"{xla_flags.OPTION}=LIBRARY_FUSION_TYPE_DOT")
    assert default[0] >= 40, default
    assert _largest_fusions(FLAG)[0] <= 16

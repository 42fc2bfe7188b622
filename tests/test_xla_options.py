"""The XLA:CPU option mlgraph puts in XLA_FLAGS on import: what it adds, and when it refuses."""

from __future__ import annotations

import os

import pytest

from mlgraph import xla_options

FLAG = f"{xla_options.OPTION}={xla_options.VALUE}"


@pytest.fixture
def no_backends(monkeypatch):
    """As before JAX's first computation (the test process has run some by now)."""
    monkeypatch.setattr(xla_options, "_backends_running", lambda: False)


def test_importing_mlgraph_put_the_option_in_this_process_xla_flags():
    assert FLAG in os.environ["XLA_FLAGS"].split()
    assert FLAG == (
        "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    )


def test_the_option_is_appended_to_the_flags_already_set(no_backends):
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert xla_options.apply_cpu_fusion_option(env, jaxlib_version="0.10.2")
    assert env == {"XLA_FLAGS": f"--xla_backend_optimization_level=0 {FLAG}"}
    env = {}
    assert xla_options.apply_cpu_fusion_option(env, jaxlib_version="0.10.2")
    assert env == {"XLA_FLAGS": FLAG}


def test_a_value_the_user_set_is_kept(no_backends):
    mine = f"{xla_options.OPTION}=LIBRARY_FUSION_TYPE_DOT"
    env = {"XLA_FLAGS": mine}
    assert xla_options.apply_cpu_fusion_option(env, jaxlib_version="0.10.2")
    assert env == {"XLA_FLAGS": mine}


def test_an_unchecked_jaxlib_gets_a_warning_and_no_option(no_backends):
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    with pytest.warns(RuntimeWarning) as caught:
        assert not xla_options.apply_cpu_fusion_option(env, jaxlib_version="0.99.0")
    assert env == {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert str(caught[0].message) == (
        f"mlgraph: not setting XLA_FLAGS {FLAG}: it was checked on jaxlib 0.10.2, and jaxlib "
        "0.99.0 is installed (XLA aborts on an option it does not know). CPU steps run up to "
        "1.4x slower without it; add it to XLA_FLAGS yourself if your jaxlib knows it."
    )


def test_running_backends_get_a_warning_that_the_option_cannot_take_effect(monkeypatch):
    monkeypatch.setattr(xla_options, "_backends_running", lambda: True)
    env = {}
    with pytest.warns(RuntimeWarning, match="JAX's backends started before mlgraph was imported"):
        assert not xla_options.apply_cpu_fusion_option(env, jaxlib_version="0.10.2")
    assert env == {}

"""Test set-up: 8 simulated CPU devices (set before jax is imported), a compilation cache for
the session, XLA's -O0, parsed absl flags, and the tiny built COCO-layout data set shared by
the training tests."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# The tests run on the CPU backend alone, as mlgraph starts it on a host without accelerators
# (`mlgraph.platforms`); libtpu and the CUDA plugin are still there to compile for
# (tests/test_bench_compile.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# XLA's compilations shared by every run of the session, the subprocesses' too (they inherit
# the environment): compiling a model's initialisation is slow on CPU, and nearly every
# training test compiles the same tiny one again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mlgraph-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# XLA's LLVM optimisations off for the tests (the subprocesses inherit it): they run tiny shapes,
# where compiling is nearly all of a test's time, and -O0 compiles much faster; convolutions
# and matrix products are library calls at any level, and every parity tolerance holds. A level
# already in XLA_FLAGS is kept.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_backend_optimization_level=0".strip()

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's multiprocessing reads an absl flag; outside app.run flags must be marked parsed.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny_coco_dir(tmp_path_factory):
    """The data_dir of `train_helpers.tiny_coco`, built once per session.

    Every test that uses it shares it, so none may change the data set.
    """
    # Imported here: train_helpers pulls in TFDS, which most test files never need.
    from train_helpers import tiny_coco

    return tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


@pytest.fixture
def one_torch_thread():
    """torch on one thread while the test runs (`torch_train_compare.torch_threads`): the torch
    side of a parity test is a tiny model, and a thread pool beside XLA's only waits."""
    # Imported here: the helper pulls in mlgraph's train step, which most test files never need.
    from torch_train_compare import torch_threads

    with torch_threads(1):
        yield

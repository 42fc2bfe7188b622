"""Test set-up: 8 simulated CPU devices (set before jax is imported), a session compilation
cache, parsed absl flags, and the tiny built COCO-layout data set shared by the training
tests."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# One persistent compilation cache for the session's process: tests that build the same model
# again (a run stopped and resumed, its evaluation) load its compiled initialisation and steps
# instead of compiling them again (XLA:CPU takes seconds to tens of seconds for each). Fresh per
# session, so nothing carries over between runs of the suite.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mlgraph-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

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

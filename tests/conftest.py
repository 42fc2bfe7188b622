"""Test set-up: 8 simulated CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags  # noqa: E402

# grain's multiprocessing reads an absl flag; outside app.run flags must be marked parsed.
flags.FLAGS.mark_as_parsed()

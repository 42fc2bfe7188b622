"""One process of a two-process CPU 'cluster' (gloo collectives), for test_multihost.py.

python tests/multihost_worker.py PORT PROCESS_ID DATA_DIR WORKDIR [TOTAL_STEPS]

TOTAL_STEPS (default 4) steps, evaluated every 4, with a checkpoint every 2.
"""

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    port, pid, data_dir, workdir = sys.argv[1:5]
    total_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    sys.path.insert(0, os.path.dirname(__file__))
    from train_helpers import tiny_config

    from mlgraph import train

    config = tiny_config(data_dir, total_steps=total_steps)
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
    train.run(config, workdir)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

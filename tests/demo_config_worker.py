"""Train shortened demo configs on one CPU device, for test_demo_configs.py.

python tests/demo_config_worker.py CACHE OUT_JSON NAME [NAME ...]

One device, not the suite's 8 simulated ones: replicated optimizer and EMA updates cost 8x on
2 cores, which would dominate these short runs. `$MLGRAPH_CACHE` is set to CACHE (empty at
first) and the 'demo' generator is shrunk, so the first run also writes and builds the data and
makes the assets. Writes {name: {"metrics": ..., "chance_mAP": ...}} to OUT_JSON.
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "1"

NUM_TRAIN, NUM_TEST = 320, 120
STEPS, BATCH, IMAGE = 25, 16, 96


def main():
    cache, out, *names = sys.argv[1:]
    os.environ["MLGRAPH_CACHE"] = cache
    sys.path.insert(0, os.path.dirname(__file__))
    import numpy as np
    from absl import flags
    from train_helpers import load_config

    from mlgraph import train
    from mlgraph.data import datasets, demo

    flags.FLAGS.mark_as_parsed()
    demo._DEFAULTS["demo"] = demo._DEFAULTS["demo"] | {"num_train": NUM_TRAIN, "num_test": NUM_TEST}
    results = {}
    for name in names:
        c = load_config(name)
        c.image_size = IMAGE
        c.batch_size = BATCH
        c.total_steps = STEPS
        c.eval_every_steps = STEPS
        c.log_every_steps = STEPS
        c.eval_batch_size = 40
        metrics = train.run(c, os.path.join(os.path.dirname(out), f"wd_{name}"))
        val = datasets.open_dataset(c.data).sources[c.data.eval_split]
        labels = np.stack([np.asarray(val[i]["labels"]) for i in range(len(val))])
        # Scores that ignore the image: each class's AP is its positive rate.
        results[name] = {"metrics": metrics, "chance_mAP": float(100 * labels.mean(0).mean())}
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()

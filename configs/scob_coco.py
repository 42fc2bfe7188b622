"""Scob (Chen, Zhao and Li, IJCV 2023) on MS-COCO 2014, the official recipe
(mlgraph.recipes.scob; docs/scob_spml.md §3):

    python -m mlgraph.data.build coco2014 --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet50-0676ba61.pth \
        --output R50 --option include_head=false
    python -m mlgraph.main --config configs/scob_coco.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=R50
    python -m mlgraph.evaluate --workdir DIR

An official checkpoint converts with `python -m mlgraph.convert --source scob --input best.pth
--output SCOB` and evaluates with `python -m mlgraph.evaluate --checkpoint SCOB --config
configs/scob_coco.py`; as `--config.init_from=SCOB` a run starts from its weights.

Protocol (the argument): `protocol=scob` (default) is the official code's: Scob's own single
positives (`random.seed(114514)` over Scob's alphabetical class order and its JSON image order,
see mlgraph.data.observed), the 82,081 train2014 images with an annotation, the epoch picked on
val2014 itself, K = 3.9 (Scob's value; COCO's true mean is about 2.9); `protocol=cole` draws
Cole's positives (seed 1200), holds out 20 % of train2014 with clean labels to pick the epoch,
K = 2.9, comparable with `spml_coco.py`'s baselines.

Frozen ImageNet ResNet-50 at 448 px, batch 8, 20 epochs (10,260 steps each), five Adam groups,
lambda_cl 0.1, tau 1, the official code's behaviour in every flag (see `configs/scob_demo.py`).
Deviations as in `scob_voc2012.py` (the official loader drops 1 of the 40,137 val images).

Expected: the paper's COCO figure could not be read here (docs/scob_spml.md §5.3). For scale, on
Cole's protocol: ROLE 66.3, EM (Zhou) 70.70 mAP.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `protocol=scob|cole`."""
    args = config_lib.parse_arg(arg, protocol="scob")
    return recipes.scob(dataset="coco2014", protocol=args.protocol)

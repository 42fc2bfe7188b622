"""Query2Label (Liu et al., 2021) on coco2014, the official R101-448 recipe
(docs/ssgrl_mlgcn.md §4.1).

ResNet-101 (ImageNet) with every batch norm frozen and conv1 + layer1 not trained; the layer4
map (14x14 at 448 px) is the memory; transformer d 2048, 4 heads, FFN 8192, 1 encoder + 2
decoder layers (no decoder self-attention), per-label linear classifiers; ASL (gamma- 2).
AdamW (wd 1e-2) under one-cycle to 1e-4 (pct 0.2, beta1 cycled), batch 128, 80 epochs, EMA
0.9997 (the best EMA checkpoint is kept). Train: resize + Cutout 0.5 + RandAugment, no flip.
All images, unlabelled ones included, as the official CocoDetection loader: builder config
'all'.

    python -m mlgraph.data.build coco2014 --config all --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet101.pth \
        --output WEIGHTS --option include_head=false
    python -m mlgraph.main --config configs/q2l_coco.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

The released checkpoint instead: `python -m mlgraph.convert --source q2l --input
checkpoint.pkl --option config=config_new.json --output Q2L` then `python -m mlgraph.evaluate
--checkpoint Q2L --config configs/q2l_coco.py`.

Expected: 84.9 mAP (paper Table 1, R101 at 448).
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `size=448|576` (`configs/q2l_coco.py:size=576` is
    `q2l_coco576.py`)."""
    args = config_lib.parse_arg(arg, size=448)
    return recipes.q2l(dataset="coco2014", image_size=args.size, builder_config="all")

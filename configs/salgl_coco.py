"""SALGL (Zhu et al., ICCV 2023) on coco2014: resnet101 at 448px, K=6 scenes.

Recipe of docs/salgl.md §3 (mlgraph.recipes.salgl). Build the data set once, convert the
ImageNet backbone, then train (resumes from the workdir):

    python -m mlgraph.data.build coco2014 --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input BACKBONE.pth --output WEIGHTS \
        --option include_head=false
    python -m mlgraph.main --config configs/salgl_coco.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

Expected: 85.8 mAP (paper, ResNet-101 448); the unofficial reproduction reached 85.76.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `mode=full|part|layer4` and `size=448|576`
    (`configs/salgl_coco.py:size=576` is `salgl_coco576.py`)."""
    args = config_lib.parse_arg(arg, mode="full", size=448)
    return recipes.salgl(
        dataset="coco2014",
        image_size=args.size,
        backbone="resnet101",
        num_scenes=6,
        mode=args.mode,
    )

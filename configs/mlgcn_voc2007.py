"""ML-GCN (Chen et al., CVPR 2019) on VOC 2007 trainval -> test (see mlgcn_coco.py for the recipe:
SGD 0.1 / 0.01, clip 10, MultiScaleCrop + flip).

ResNet-101 at 448 px, global max pooling (pool='global', at 448 px the same as the released
MaxPool2d(14, 14); see recipes.mlgcn), the two-layer GCN over gen_A(tau 0.4, p 0.25) of the
trainval co-occurrence; BCE. The training labels count difficult objects as positives, as
ML-GCN's VOC loader does.

    python -m mlgraph.data.build voc2007 --manual_dir RAW --data_dir DATA
    python -m mlgraph.main --config configs/mlgcn_voc2007.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

Expected: 94.0 mAP (README), non-interpolated: compare `eval/mAP_noninterp`.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config (no arguments)."""
    config_lib.parse_arg(arg)
    return recipes.mlgcn(dataset="voc2007")

"""SSGRL (Chen et al., ICCV 2019) on VOC 2007 trainval -> test, official recipe (see ssgrl_coco.py).

ResNet-101 at 576 px, layer4 and head trained, Adam 1e-5 constant, batch 4, 200 epochs, BCE.
Training labels as SSGRL's: a class present only as difficult objects is negative
(data.train_difficult='negative'; the voc2007 builder stores such classes as positives on
trainval, ML-GCN's and SALGL's convention); test leaves those pairs out.

    python -m mlgraph.main --config configs/ssgrl_voc2007.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

Expected: 93.4 mAP (README; 95.0 with COCO pre-training).
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config (no arguments)."""
    config_lib.parse_arg(arg)
    c = recipes.ssgrl(dataset="voc2007")
    c.data.train_difficult = "negative"
    return c

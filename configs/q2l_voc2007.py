"""Query2Label on VOC 2007 trainval -> test: the official R101 recipe of q2l_coco.py at 448 px.

Training labels count difficult objects as positives (the voc2007 builder's convention); test
metrics leave the difficult-only pairs out.

    python -m mlgraph.data.build voc2007 --manual_dir RAW --data_dir DATA
    python -m mlgraph.main --config configs/q2l_voc2007.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

Expected: the Q2L paper reports VOC 2007; the figure was not verified here
(docs/ssgrl_mlgcn.md §5.2).
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config (no arguments)."""
    config_lib.parse_arg(arg)
    return recipes.q2l(dataset="voc2007", image_size=448)

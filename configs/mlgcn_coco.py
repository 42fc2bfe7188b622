"""ML-GCN (Chen et al., CVPR 2019) on coco2014, the official code's recipe
(docs/ssgrl_mlgcn.md §3.1).

ResNet-101 at 448 px, global max pooling (pool='global', at 448 px the same as the released
MaxPool2d(14, 14); see recipes.mlgcn), two bias-free graph convolutions (300/E -> 1024 -> 2048,
LeakyReLU 0.2) over D A^T D, A = gen_A(tau 0.4, p 0.25) of the train2014 co-occurrence;
labelled images only (builder config 'nonempty': 82,081 / 40,137); BCE
(= MultiLabelSoftMarginLoss).

The official optimizer: SGD (momentum 0.9, L2 1e-4), lr 0.1 for the GCN and 0.01 for the backbone,
gradient norm clipped to 10, x0.1 at the start of epoch 30 (--epoch_step, the optimizer's
milestones), after the 20 epochs: constant here. Train augmentation: ML-GCN's MultiScaleCrop (scales
1.0-0.5 of the shorter side, max_distort 2, 13 fixed positions) to 448, then flip. Word vectors: the
GloVe file (--config.model.embed_path=glove.npy, in this data set's class order) or, by default, the
offline MiniLM ('minilm').

    python -m mlgraph.main --config configs/mlgcn_coco.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

Expected: 83.0 mAP (README), ML-GCN's non-interpolated AP: compare `eval/mAP_noninterp` (the
`mAP_ni` column of mlgraph.evaluate), which runs slightly below the interpolated `eval/mAP`.
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config (no arguments)."""
    config_lib.parse_arg(arg)
    return recipes.mlgcn(dataset="coco2014")

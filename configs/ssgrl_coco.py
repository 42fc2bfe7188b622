"""SSGRL (Chen et al., ICCV 2019) on coco2014 with the official code's recipe
(docs/ssgrl_mlgcn.md §1.7).

ResNet-101 at 576 px with the extra 2x2 average pool (9x9 locations); conv1..layer3 frozen with
their batch norm in eval mode, layer4 and the head trained (layer4 batch norm in train mode);
Adam lr 1e-5, default betas, no weight decay, constant learning rate; batch 4, 200 epochs (the
official code keeps the best epoch on val); train: resize 640, random crop of a side from
{640, 576, 512, 384, 320}, resize 576, no flip; test: resize 640, centre crop 576; BCE. All
images (unlabelled ones included) as in the official code: builder config 'all'. Word
vectors: the paper's 300-d GloVe file (--config.model.embed_path=vectors.npy) or, by default,
the offline MiniLM ('minilm'); graph: P(j | i) from the training labels ('train_labels'), or
the official prob_train.npy.

Train and test transforms are the official ones (data.augment = 'ssgrl',
data.eval_center_crop_from).

    python -m mlgraph.convert --source torchvision_resnet --input resnet101.pth \
        --output WEIGHTS --option include_head=false
    python -m mlgraph.main --config configs/ssgrl_coco.py --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=WEIGHTS

Expected: 83.8 mAP (README; the official code reproduces ~83.2, issue #16).
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config (no arguments)."""
    config_lib.parse_arg(arg)
    return recipes.ssgrl(dataset="coco2014", builder_config="all")

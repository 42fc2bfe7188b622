"""Single-positive multi-label learning (SPML) on COCO 2014: Cole et al.'s protocol with
Zhou et al.'s hyper-parameters (mlgraph.recipes.spml; docs/scob_spml.md §1-§2).

The protocol, the loss argument (`an`, `an_ls`, `wan`, `epr`, `role`, `em`, `em_apl`, or the
full-label oracle `full`) and the linear-init mode are described in `recipes.spml`:

    python -m mlgraph.data.build coco2014 --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet50-0676ba61.pth \
        --output R50 --option include_head=false
    python -m mlgraph.main --config configs/spml_coco.py:loss=em --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=R50

Read the test mAP `eval/spml_mAP` at the best `val/spml_mAP` (the kept checkpoint:
`python -m mlgraph.evaluate --workdir DIR`, column mAP_sp). Batch 16, lr 1e-5 (Zhou's).

Expected (Cole et al. protocol, end to end, §5.1):
    full     78.00
    an       64.10
    wan      64.80
    an_ls    66.90
    epr      63.30
    role     66.30
Expected (Zhou et al., with early stopping, §5.2):
    full     76.78
    an       64.92
    role     67.04
    em       70.70
    em_apl   70.87
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `loss=an|an_ls|wan|epr|role|em|em_apl|full`,
    `observed=cole|scob` and `mode=end_to_end|linear`."""
    args = config_lib.parse_arg(arg, loss="em", observed="cole", mode="end_to_end")
    return recipes.spml(dataset="coco2014", loss=args.loss, observed=args.observed, mode=args.mode)

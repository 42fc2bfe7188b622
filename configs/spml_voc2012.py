"""Single-positive multi-label learning (SPML) on VOC 2012: Cole et al.'s protocol with
Zhou et al.'s hyper-parameters (mlgraph.recipes.spml; docs/scob_spml.md §1-§2).

The protocol, the loss argument (`an`, `an_ls`, `wan`, `epr`, `role`, `em`, `em_apl`, or the
full-label oracle `full`) and the linear-init mode are described in `recipes.spml`:

    python -m mlgraph.data.build voc2012 --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source torchvision_resnet --input resnet50-0676ba61.pth \
        --output R50 --option include_head=false
    python -m mlgraph.main --config configs/spml_voc2012.py:loss=em --workdir DIR \
        --config.data.data_dir=DATA --config.init_from=R50

Read the test mAP `eval/spml_mAP` at the best `val/spml_mAP` (the kept checkpoint:
`python -m mlgraph.evaluate --workdir DIR`, column mAP_sp). Batch 8, lr 1e-5 (Zhou's).
Deviation: mlgraph's metrics leave VOC's difficult (image, class) pairs out, where Cole's label
files count them as negatives; the single positives are drawn from the non-difficult ones, as
Cole's.

Expected (Cole et al. protocol, end to end, §5.1):
    full     90.20
    an       85.10
    wan      86.50
    an_ls    86.70
    epr      85.50
    role     87.90
Expected (Zhou et al., with early stopping, §5.2):
    full     89.42
    an       85.89
    role     87.77
    em       89.09
    em_apl   89.19
"""

from mlgraph import config_lib, recipes


def get_config(arg=None):
    """The config; `arg` accepts `loss=an|an_ls|wan|epr|role|em|em_apl|full`,
    `observed=cole|scob` and `mode=end_to_end|linear`."""
    args = config_lib.parse_arg(arg, loss="em", observed="cole", mode="end_to_end")
    return recipes.spml(dataset="voc2012", loss=args.loss, observed=args.observed, mode=args.mode)

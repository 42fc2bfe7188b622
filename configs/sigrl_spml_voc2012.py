"""SigRL's single-positive mode on VOC 2012: the CLIP ViT-B/16 SigRL model fully
fine-tuned with the EM loss on Cole et al.'s single positives (docs/sigrl.md §4;
mlgraph.recipes.sigrl_spml). The released SPML code does not run (§8 S1-S6); this is what it
intends: logits = the fused score, sigmoid, EM (alpha 0.2), Adam lr 1e-5, 10 epochs of
batch 1, the best epoch by the clean validation mAP (20 % of the training split).

    python -m mlgraph.data.build voc2012 --manual_dir RAW --data_dir DATA
    python -m mlgraph.convert --source openai_clip --input ViT-B-16.pt --output CLIP_VIS
    python -m mlgraph.labels --encoder clip --weights CLIP_TEXT \\
        --vocab bpe_simple_vocab_16e6.txt.gz --dataset voc2012 --data_dir DATA --output emb.npy
    python -m mlgraph.main --config configs/sigrl_spml_voc2012.py --workdir DIR \\
        --config.data.data_dir=DATA --config.init_from=CLIP_VIS --config.model.embed_path=emb.npy

The label embeddings must be 512-d CLIP ViT-B/16 text features (the shipped 768-d VLPL files
are ViT-L/14 features and do not fit, §8 S3); the SPML prompt is unknown, the OV prompt "There
is a {} in the scene" is the mlgraph.labels default for clip. Deviation: images are resized to
224 directly, where the code resizes to 448 and then 2x2-averages the normalised tensor.
Expected: SigRL's SPML numbers were not retrievable (§7.1); for scale, EM with ResNet-50 at
448 px reaches 89.09 (VLPL's table).
"""

from mlgraph import recipes


def get_config(arg=None):
    """The config (no arguments)."""
    del arg
    return recipes.sigrl_spml(dataset="voc2012")

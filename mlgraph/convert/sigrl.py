"""SigRL state dict (`CLIPVIT.state_dict()`, docs/sigrl.md §2.6, §6) -> a whole `models.sigrl`
model.

No SigRL checkpoint is published; a run of the official code saves `model.state_dict()` (MKT's
`misc.save_model` nests it under 'model'; `mlgraph.convert.io.read_checkpoint` takes it from
there, and a DataParallel `module.` prefix is stripped). Keys:

* the CLIP ViT student at the top level, OpenAI's names without `visual.`: `conv1.weight`,
  `class_embedding`, `positional_embedding`, `ln_pre.*`, `transformer.resblocks.{i}.*`,
  `ln_post.*`, and `projection_dist` (CLIP's `visual.proj`) -> `backbone/...` (the table of
  `mlgraph.convert.openai_clip`, `proj` <- `projection_dist`);
* `SemanticDecoupling.fc3.*` -> `sda`; `DecouplingSemantic.fc1.weight` -> `fuse` (no bias);
  `DecouplingSemantic.fc3.*` -> `vfr`;
* `GATv2_1.{layer1,output}.linear_l.weight` -> `gmc/{layer1,output}/linear`, and
  `GATv2_1.{layer1,output}.attn.weight` [1, h] -> `gmc/.../attn` [h]. labml's layer with
  `share_weights=True` registers its one matrix twice, so the state dict also lists it as
  `linear_r.weight`: checked equal to `linear_l.weight` (an error naming both if not), then
  dropped;
* `projection.fc1.*`, `projection.fc2.*`: the MLP the official `CLIPVIT` builds and never uses,
  ignored on purpose (named in the summary).

Read from the shapes: the tower (width, patch, depth, grid, E from `projection_dist`; a ViT-B/16
is the registered `clip_vit_b16`, another size `clip_vit_b16` with explicit `backbone_kwargs`),
GMC's first-layer width (`layer1.linear_l.weight` rows) and heads (those rows over the width of
`layer1.attn.weight`). Not in the weights: the CLIP heads (OpenAI's rule width // 64, as its
own loader builds them), top-k (a run's `--topk`: without the option, its default 16, listed
under `settings["assumed"]` and named in a warning line, `--strict`: an error), the image size
(the position table's), and the label embeddings.

Label embeddings: a SigRL checkpoint has none (the official code reads `label_emb.pt`, the
CLIP ViT-B/16 text features of the queried labels, at run time). With the option
`label_embeddings` they become the model's table (its rows = the classes, in the file's order);
without it the table is zeros [num_classes, E], and scores need `label_embeddings=` given to the
forward pass (a zero table gives NaN scores). A config that starts from the converted folder
(`config.init_from`) takes the table from it, so convert with the embeddings the config means.

The model is built with `distill=False`: the checkpoint holds no teacher (SigRL's frozen CLIP
copy), so it serves evaluation and SPML; OV training starts from the OpenAI CLIP weights.

Options:
  label_embeddings: str, default "" (= a zero table); a `.npy`, one-array `.npz` or torch file
    holding the label embeddings [C, E] (SigRL's `label_emb.pt`); C becomes num_classes.
  num_classes: int, default 0 (= the rows of `label_embeddings`; without it 1006, NUS-WIDE's
    925 seen + 81 unseen labels of SigRL's `label_emb.pt`, named as assumed).
  image_size: int, default 0 (= the checkpoint's own grid x patch; another size resizes the
    position table, as `--source openai_clip` does).
  num_heads: int, default 0 (= width // 64); the CLIP tower's attention heads.
  topk: int, default 0 (= 16, the default of SigRL's `--topk`, named as assumed: its
    inference.py runs with 18); patches averaged in the local score.
  prefix: str, default "module."; stripped from every key that has it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mlgraph.convert import core, openai_clip
from mlgraph.convert.io import read_array

OPTIONS = {
    "label_embeddings": "",
    "num_classes": 0,
    "image_size": 0,
    "num_heads": 0,
    "topk": 0,
    "prefix": "module.",
}
# SigRL's label_emb.pt rows (NUS-WIDE: 925 seen tags + 81 unseen concepts), the table size taken
# when neither the option num_classes nor label embeddings give one.
DEFAULT_NUM_CLASSES = 1006
DEFAULT_TOPK = 16  # SigRL's --topk default (its inference.py passes 18)
GAT = "GATv2_1"
GAT_LAYERS = ("layer1", "output")
# The CLIP student's keys at the top level (OpenAI's `visual.` names without the prefix).
TOWER_KEYS = re.compile(
    r"(conv1\.weight|class_embedding|positional_embedding|projection_dist"
    r"|(ln_pre|ln_post|transformer)\..+)"
)
PROJECTION = "projection_dist"
# The unused MLP `projection` (fc1 width -> E, tanh, fc2 E -> E).
UNUSED = [r"projection\.fc[12]\.(weight|bias)"]
REQUIRED = (
    "conv1.weight",
    "positional_embedding",
    PROJECTION,
    "SemanticDecoupling.fc3.weight",
    "DecouplingSemantic.fc1.weight",
    "DecouplingSemantic.fc3.weight",
    f"{GAT}.layer1.linear_l.weight",
    f"{GAT}.layer1.attn.weight",
    f"{GAT}.output.linear_l.weight",
)


def clip_key(key: str) -> str:
    """A SigRL tower key -> its OpenAI CLIP name (`conv1.weight` -> `visual.conv1.weight`,
    `projection_dist` -> `visual.proj`)."""
    return "visual.proj" if key == PROJECTION else f"visual.{key}"


def sigrl_key(key: str) -> str:
    """An OpenAI CLIP image key -> its SigRL name (the inverse of `clip_key`)."""
    key = key.removeprefix("visual.")
    return PROJECTION if key == "proj" else key


def drop_shared_copies(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict without the GATv2 layers' `linear_r.weight`, each checked equal to its
    `linear_l.weight` (labml's `share_weights=True`: one matrix registered twice).

    Raises:
      ConversionError: a `linear_r.weight` that is missing or holds other values.
    """
    out = dict(state_dict)
    problems = []
    for layer in GAT_LAYERS:
        left, right = f"{GAT}.{layer}.linear_l.weight", f"{GAT}.{layer}.linear_r.weight"
        if left not in out:
            continue  # named by the required keys
        if right not in out:
            problems.append(f"{right} is missing (the shared matrix is listed as {left} too)")
            continue
        a, b = np.asarray(out[left]), np.asarray(out.pop(right))
        if a.shape != b.shape or not np.array_equal(a, b):
            problems.append(f"{left} and {right} differ")
    if problems:
        raise core.ConversionError(
            "SigRL's GATv2 layers share one matrix between source and target "
            f"(share_weights=True), but {'; '.join(problems)}"
        )
    return out


def tower_view(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CLIP student's entries under their OpenAI names (`visual.*`)."""
    return {clip_key(k): v for k, v in state_dict.items() if TOWER_KEYS.fullmatch(k)}


def _label_table(path: str, num_classes: int, dim: int) -> np.ndarray:
    try:
        table = read_array(path)
    except FileNotFoundError as e:
        raise core.ConversionError(f"option label_embeddings={path}: no such file") from e
    except core.ConversionError as e:
        raise core.ConversionError(f"option label_embeddings={path}: {e}") from e
    if table.ndim != 2 or table.shape[1] != dim:
        raise core.ConversionError(
            f"option label_embeddings={path}: holds an array of shape {table.shape}; expected "
            f"[C, {dim}] (E = projection_dist's width)"
        )
    if num_classes and table.shape[0] != num_classes:
        raise core.ConversionError(
            f"option label_embeddings={path}: holds {table.shape[0]} rows, but the option "
            f"num_classes={num_classes}"
        )
    return table.astype(np.float32)


def infer_settings(
    state_dict: Mapping[str, np.ndarray],
    *,
    num_classes: int = 0,
    image_size: int = 0,
    num_heads: int = 0,
    topk: int = 0,
) -> dict[str, Any]:
    """The weights-checkpoint settings of a SigRL state dict (no prefix, no `linear_r` copies).

    Returns {"kind": "model", "model": {the config.model fields the weights fix}, "build":
    {"embed_path": ""}, "num_classes", "image_size", "assumed": {each of num_classes (1006)
    and topk (16) given as 0, with the value taken}}.

    Raises:
      ConversionError: a state dict that is not SigRL's, or shapes that disagree.
    """
    core.require_keys(state_dict, REQUIRED, "a SigRL")
    r = core.SettingsResolver(
        "", defaults={"num_classes": DEFAULT_NUM_CLASSES, "topk": DEFAULT_TOPK}
    )
    tower = openai_clip.infer_visual_settings(
        tower_view(state_dict), image_size=image_size, num_heads=num_heads
    )
    e = tower["embed_dim"]
    shape = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    hidden = shape[f"{GAT}.layer1.linear_l.weight"][0]
    head_dim = shape[f"{GAT}.layer1.attn.weight"][-1]
    want = {
        "SemanticDecoupling.fc3.weight": (e, e),
        "DecouplingSemantic.fc1.weight": (e, 2 * e),
        "DecouplingSemantic.fc3.weight": (e, e),
        f"{GAT}.layer1.linear_l.weight": (hidden, e),
        f"{GAT}.output.linear_l.weight": (e, hidden),
        f"{GAT}.output.attn.weight": (1, e),
    }
    problems = [
        f"{key} has shape {shape.get(key)}, expected {w}"
        for key, w in want.items()
        if shape.get(key) != w
    ]
    if not (0 < head_dim <= hidden and hidden % head_dim == 0):
        problems.append(
            f"{GAT}.layer1.attn.weight has shape {shape[f'{GAT}.layer1.attn.weight']}, expected "
            f"(1, h) with h dividing {hidden}"
        )
    if problems:
        raise core.ConversionError(f"projection_dist gives E={e}, but " + "; ".join(problems))
    if tower["backbone"] == "clip_vit_b16":
        backbone_kwargs: dict[str, Any] = {}
    else:
        names = ("width", "depth", "num_heads", "patch_size", "embed_dim")
        backbone_kwargs = {"variant": None} | {k: tower[k] for k in names}
    model = {
        "name": "sigrl",
        "backbone": "clip_vit_b16",
        "backbone_kwargs": backbone_kwargs,
        "embed_dim": e,
        "gat_hidden": hidden,
        "gat_heads": hidden // head_dim,
        "topk": int(r.first("topk", topk or None)),
        "distill": False,
    }
    return core.model_settings(
        model,
        {"embed_path": ""},
        num_classes=r.first("num_classes", num_classes or None),
        image_size=tower["image_size"],
        assumed=r.assumed,
    )


def attention_vector(w: np.ndarray) -> np.ndarray:
    """labml's `attn = nn.Linear(hidden, 1, bias=False)` weight [1, h] -> the vector [h]."""
    return w.reshape(-1)


def table(module) -> dict[str, tuple[str, core.Transform]]:
    """NNX path -> (SigRL key, transform) for every parameter of a CLIP `sigrl.SigRL` built
    with distill=False (the label table is not in the state dict)."""
    t: dict[str, tuple[str, core.Transform]] = {
        f"backbone/{path}": (sigrl_key(key), transform)
        for path, (key, transform) in openai_clip.table(module.backbone).items()
    }
    for layer in GAT_LAYERS:
        key = f"{GAT}.{layer}"
        t[f"gmc/{layer}/linear/kernel"] = (f"{key}.linear_l.weight", core.linear_kernel)
        t[f"gmc/{layer}/attn"] = (f"{key}.attn.weight", attention_vector)
    t |= core.linear("sda", "SemanticDecoupling.fc3")
    t |= core.linear("fuse", "DecouplingSemantic.fc1", bias=False)
    return t | core.linear("vfr", "DecouplingSemantic.fc3")


def convert(
    state_dict: Mapping[str, np.ndarray], options: Mapping[str, Any]
) -> tuple[nnx.Module, dict]:
    """Build the SigRL `state_dict` describes and fill it; returns (module, settings)."""
    opts = core.check_options(options, OPTIONS)
    state_dict = drop_shared_copies(core.strip_prefix(state_dict, opts["prefix"]))
    core.require_keys(state_dict, REQUIRED, "a SigRL")
    dim = int(np.shape(state_dict[PROJECTION])[1])
    labels = None
    if opts["label_embeddings"]:
        labels = _label_table(opts["label_embeddings"], opts["num_classes"], dim)
    num_classes = labels.shape[0] if labels is not None else opts["num_classes"]
    settings = infer_settings(
        state_dict,
        num_classes=num_classes,
        image_size=opts["image_size"],
        num_heads=opts["num_heads"],
        topk=opts["topk"],
    )
    module = core.build_abstract(settings, "SigRL")
    core.load_into(
        module,
        state_dict,
        table(module),
        ignored=UNUSED,
        keep_init=["label_embeddings"],
        source="SigRL",
    )
    c = settings["num_classes"]
    if labels is None:
        labels = np.zeros((c, dim), np.float32)
        where = (
            f"zeros [{c}, {dim}]: a SigRL checkpoint has no label embeddings (the official code "
            "reads label_emb.pt); pass --option label_embeddings=FILE, or label_embeddings= to "
            "the forward pass"
        )
    else:
        where = f"[{c}, {dim}] from {opts['label_embeddings']} (rows = the classes, in its order)"
    module.label_embeddings.set_value(labels)
    unused = sum(
        int(np.size(v)) for k, v in state_dict.items() if any(re.fullmatch(p, k) for p in UNUSED)
    )
    settings["notes"] = [
        f"label embeddings: {where}",
        f"ignored on purpose: projection.fc1/fc2.* ({unused:,} values), the MLP SigRL's CLIPVIT "
        "builds and never uses",
        f"{GAT}.*.linear_r.weight: the shared GATv2 matrices, equal to linear_l.weight, used once",
        "built with distill=False: the checkpoint holds no teacher (evaluation, SPML)",
    ]
    return module, settings

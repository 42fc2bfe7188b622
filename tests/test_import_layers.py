"""Imports point down (DESIGN: entry points -> train/evaluation/workdir -> models, data,
convert -> small neutral modules): every `import` in the package, at module level or inside a
function, is checked against the layer table below."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mlgraph"

# (layer, module prefixes); a module is in the layer of its longest matching prefix, and may
# import its own layer and those above it in this list.
LAYERS = [
    (
        "neutral",
        (
            "mlgraph",
            "mlgraph.errors",
            "mlgraph.paths",
            "mlgraph.textfiles",
            "mlgraph.xla_options",
            "mlgraph.platforms",
            "mlgraph.labels",
            "mlgraph.labels.arrays",
            "mlgraph.labels.cooccurrence",
            "mlgraph.labels.embeddings",
        ),
    ),
    (
        "utilities",
        (
            "mlgraph.metrics",
            "mlgraph.losses",
            "mlgraph.optim",
            "mlgraph.sharding",
            "mlgraph.accelerators",
            "mlgraph.checkpointing",
            "mlgraph.divergence",
            "mlgraph.preemption",
            "mlgraph.workdir_lock",
            "mlgraph.metric_writer",
            "mlgraph.pseudo_labels",
            "mlgraph.step_cost",
            "mlgraph.cli",
            "mlgraph.torch_reference",
        ),
    ),
    ("models and data", ("mlgraph.models", "mlgraph.data")),
    ("converters", ("mlgraph.convert",)),
    (
        "configs and assets",
        ("mlgraph.labels.encoders", "mlgraph.assets", "mlgraph.config_lib", "mlgraph.recipes"),
    ),
    ("runs", ("mlgraph.workdir", "mlgraph.evaluation")),
    ("train state", ("mlgraph.init_from", "mlgraph.train_state", "mlgraph.train_step")),
    ("training loop", ("mlgraph.train",)),
    (
        "entry points",
        (
            "mlgraph.main",
            "mlgraph.evaluate",
            "mlgraph.predict",
            "mlgraph.bench",
            "mlgraph.bench_input",
            "mlgraph.bench_torch",
            "mlgraph.bench_compile",
            "mlgraph.viz",
            "mlgraph.labels.__main__",
            "mlgraph.convert.__main__",
            "mlgraph.data.build",
        ),
    ),
]
# Imports within a layer that still run the wrong way: (importer prefix, imported prefix).
FORBIDDEN = [
    ("mlgraph.models", "mlgraph.data"),
    ("mlgraph.data", "mlgraph.models"),
    ("mlgraph.data", "mlgraph.cli"),
]


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The index in LAYERS of `module`'s longest matching prefix."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if _matches(module, p) and len(p) > best:
                best, found = len(p), i
    assert found is not None, module
    return found


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: pathlib.Path) -> set[str]:
    """The mlgraph modules `path` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mlgraph"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlgraph":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if _is_module(full) else node.module)
    return found


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Each import of `edges` ({importer: imported}) that runs upward or is forbidden."""
    out = []
    for importer, imported in sorted(edges.items()):
        for target in sorted(imported):
            up = layer_of(target) > layer_of(importer)
            # An entry point under a library package (mlgraph.data.build) is an entry point.
            entry = LAYERS[layer_of(importer)][0] == "entry points"
            banned = not entry and any(
                _matches(importer, a) and _matches(target, b) for a, b in FORBIDDEN
            )
            if up or banned:
                out.append(
                    f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    return out


def package_edges() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down():
    assert violations(package_edges()) == []


def test_every_module_has_a_layer():
    for module in package_edges():
        layer_of(module)  # asserts


@pytest.mark.parametrize(
    "importer, target, layers",
    [
        ("mlgraph.models.ssgrl", "mlgraph.data.cooccurrence", ("models and data",) * 2),
        ("mlgraph.data.pipeline", "mlgraph.cli", ("models and data", "utilities")),
        ("mlgraph.data.observed", "mlgraph.convert.core", ("models and data", "converters")),
        ("mlgraph.convert.salgl", "mlgraph.recipes", ("converters", "configs and assets")),
        ("mlgraph.convert.q2l", "mlgraph.train", ("converters", "training loop")),
        ("mlgraph.workdir", "mlgraph.train_state", ("runs", "train state")),
    ],
)
def test_an_upward_import_is_caught(importer, target, layers):
    assert violations({importer: {target}}) == [
        f"{importer} ({layers[0]}) imports {target} ({layers[1]})"
    ]


def test_the_parser_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "from mlgraph import paths\n"
        "def f():\n"
        "    from mlgraph.data import datasets, registry\n"
        "    import mlgraph.train\n"
    )
    assert imports_of(path) == {
        "mlgraph.paths",
        "mlgraph.data.datasets",
        "mlgraph.data.registry",
        "mlgraph.train",
    }

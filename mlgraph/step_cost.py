"""Where a step's FLOPs go: XLA's cost analysis of each named part of a traced function.

The function is traced once (`jax.make_jaxpr`); each top-level equation is assigned to a part
by the `jax.named_scope` it was traced under (the models and the loop name theirs: SALGL's
`backbone`, `encoder`, `scene_graph`, `attention`, `ggnn`, `classifier`, and the loop's `loss`,
`optimizer`, `ema`), split into forward and backward where the scope was differentiated
(`jvp(...)` / `transpose(jvp(...))` in the name stack); equations under no scope are `other`.
Each part's equations become a function of their own (inputs: the values they read from other
parts; outputs: the values other parts or the result read), lowered for the same abstract
inputs, and its FLOPs are XLA's count for that lowered module, before XLA's optimisations
(`Lowered.cost_analysis`): nothing is compiled, so the profile of an R101 step takes seconds
rather than a compile per part, and the parts add up to the whole step's count of the same
kind (the tests check 5 %). The compiled step's count, which `bench` prints beside
it, differs by a few percent (fusion and simplification).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

OTHER = "other"
_WRAPPED = re.compile(r"^(\w+)\((.*)\)$")


def part_of(name_stack: str) -> str:
    """The part a name stack belongs to: its outermost scope, with ' forward' or ' backward'
    where the scope sits inside a differentiation (`jvp(...)`, `transpose(jvp(...))`)."""
    first = name_stack.split("/")[0]
    transforms = []
    while (m := _WRAPPED.match(first)) is not None:
        transforms.append(m.group(1))
        first = m.group(2).split("/")[0]
    if not first:
        return OTHER
    if "transpose" in transforms:
        return f"{first} backward"
    if "jvp" in transforms:
        return f"{first} forward"
    return first


def _flops(fn: Callable, args: list) -> float:
    analysis = jax.jit(fn).lower(*args).cost_analysis() or {}
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0))


def cost_by_part(fn: Callable, *args: Any) -> tuple[dict[str, float], float]:
    """({part: FLOPs}, the whole function's FLOPs) of `fn(*args)` (see the module docstring).

    `args` may be arrays or `jax.ShapeDtypeStruct`s; parts appear in the order their first
    equation was traced.
    """
    parts, total = measure_by_part(_flops, fn, *args)
    return {name: 0.0 if v is None else v for name, v in parts.items()}, total


def measure_by_part(
    measure: Callable[[Callable, list], Any], fn: Callable, *args: Any
) -> tuple[dict[str, Any], Any]:
    """({part: measure of the part}, measure of the whole function) of `fn(*args)`, each part
    made a function of its own as in `cost_by_part`; `measure(function, abstract args)` is,
    for example, XLA's FLOP count of the lowered function or the cost model's time of the
    function compiled for a TPU (`mlgraph.bench_compile`). A part that returns nothing
    measures as None."""
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr = closed.jaxpr
    consts = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    parts: dict[str, list] = {}
    for eqn in jaxpr.eqns:
        parts.setdefault(part_of(str(eqn.source_info.name_stack)), []).append(eqn)
    # Where each value is read: by which parts, and whether the function returns it.
    readers: dict[Any, set[str]] = {}
    for name, eqns in parts.items():
        for eqn in eqns:
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    readers.setdefault(v, set()).add(name)
    returned = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    flops = {}
    for name, eqns in parts.items():
        defined = {v for eqn in eqns for v in eqn.outvars}
        inputs, seen = [], set()
        for eqn in eqns:
            for v in eqn.invars:
                if isinstance(v, jcore.Var) and v not in defined and v not in seen:
                    seen.add(v)
                    inputs.append(v)
        outputs = [
            v
            for eqn in eqns
            for v in eqn.outvars
            if not isinstance(v, jcore.DropVar)
            and (v in returned or readers.get(v, set()) - {name})
        ]
        if not outputs:
            flops[name] = None
            continue
        sub = jcore.ClosedJaxpr(jcore.Jaxpr([], inputs, outputs, eqns), [])
        abstract = [
            consts[v] if v in consts else jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
            for v in inputs
        ]
        flops[name] = measure(jcore.jaxpr_as_fun(sub), abstract)
    return flops, measure(fn, list(args))


def format_table(flops: dict[str, float], total: float) -> str:
    """A text table: each part's GFLOP and share of the whole, then the parts' sum."""
    lines = [f"{'part':<24} {'GFLOP':>12} {'share':>7}"]
    for name, value in sorted(flops.items(), key=lambda kv: -kv[1]):
        share = 100 * value / total if total else 0.0
        lines.append(f"{name:<24} {value / 1e9:12.3f} {share:6.1f}%")
    summed = sum(flops.values())
    lines.append(f"{'sum of parts':<24} {summed / 1e9:12.3f} {100 * summed / max(total, 1):6.1f}%")
    lines.append(f"{'step (XLA)':<24} {total / 1e9:12.3f} {100.0:6.1f}%")
    return "\n".join(lines)

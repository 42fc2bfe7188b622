"""What the many-step training parity tests share (issue 33): fixed images and batches, mlgraph's
real training (its jitted step with the loop's shardings, and the method's epoch hook as the
loop calls it), the torch side's values brought into mlgraph's tree through the method's
converter table, and relative differences.

Weights and running statistics are compared as *changes from the common start* (their
updates): at the papers' learning rates a weight moves by 1e-4 of itself, so the weights
themselves would agree whether or not the updates do.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mlgraph import evaluation, sharding, train, train_step
from mlgraph.data import pipeline


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The torch side on one thread (a test module imports this fixture): its models are tiny,
    and a thread pool only adds waiting (minutes on a loaded 2-core host)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images_and_labels(n: int, size: int, num_classes: int, seed: int):
    """(the training source: n random RGB images [size, size, 3] uint8 with multi-hot labels,
    the labels [n, C], one observed positive per image [n, C])."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_classes)) < 0.35).astype(np.float32)
    labels[np.arange(n), rng.integers(0, num_classes, n)] = 1.0
    observed = np.zeros_like(labels)
    for i in range(n):
        observed[i, rng.choice(np.flatnonzero(labels[i]))] = 1.0
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    source = [{"image": pixels[i], "labels": labels[i]} for i in range(n)]
    return source, labels, observed


def normalised(source, config, num_classes: int) -> np.ndarray:
    """The source's images through the config's evaluation transform (at their own size:
    resizing is the identity), as the pseudo-labelling pass reads them."""
    transform = pipeline.EvalTransform.from_config(config, num_classes)
    return np.stack([transform.map(x)["image"] for x in source])


def fixed_batches(n: int, batch: int, epochs: int, seed: int) -> list[list[np.ndarray]]:
    """Per epoch, a fresh permutation of the n rows cut into n // batch batches."""
    rng = np.random.default_rng(seed)
    return [
        [p[i : i + batch] for i in range(0, n - batch + 1, batch)]
        for p in (rng.permutation(n) for _ in range(epochs))
    ]


def mlgraph_run(mod, graphdef, tx, state, config, training, images, labels, epochs):
    """mlgraph's training over the fixed `epochs` of batches: the method's step from
    `train_step.make_train_step` (the finite check included), jitted as `train.Loop` jits it
    (state replicated, batch sharded over the devices), and the method's `epoch_end` with the
    loop's `HookContext` after each epoch. Returns (the last state, the metrics of every step
    as numpy)."""
    mesh = sharding.make_mesh()
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state = jax.device_put(state, repl)
    state_sh = jax.tree.map(lambda _: repl, state)
    total = sum(len(e) for e in epochs)
    step = jax.jit(
        train_step.make_train_step(mod, graphdef, tx, config, total),
        in_shardings=(state_sh, data_sh),
        out_shardings=(state_sh, repl),
    )
    hooks = None
    if hasattr(mod, "epoch_end"):
        scorer = evaluation.Scorer(
            mod, config, graphdef, mesh, state, training.num_classes, evaluation.live
        )
        hooks = train.HookContext(
            config, mesh, training.source, training.num_classes, graphdef, scorer
        )
    records, done = [], 0
    for batches in epochs:
        for rows in batches:
            batch = {"image": images[rows], "labels": labels[rows], "index": rows.astype(np.int32)}
            state, metrics = step(state, jax.device_put(batch, data_sh))
            records.append(jax.device_get(metrics))
            done += 1
        epoch = train.epochs_done(done, config.batch_size, training.num_examples)
        if hooks is not None and epoch > train.epochs_done(
            done - len(batches), config.batch_size, training.num_examples
        ):
            state = mod.epoch_end(hooks, state, epoch)
    return jax.device_get(state), records


def to_mlgraph(table: dict, values: dict) -> dict[str, np.ndarray]:
    """mlgraph path -> array of torch values {torch key: tensor or array} (a state dict, or
    Adam's moments under the parameters' names) through the converter's `table`, in their
    own precision; paths whose key `values` lacks are left out."""
    out = {}
    for path, (key, transform) in table.items():
        if key in values:
            out[path] = np.asarray(transform(as_array(values[key])))
    return out


def flat(tree) -> dict[str, np.ndarray]:
    """'/'-joined path -> numpy array of a nested tree (States, dicts, optax states); nnx
    Variables' `value` level is left out."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(n for n in names if n != "value")] = np.asarray(leaf)
    return out


def rel(got, want) -> float:
    """max |got - want| / max |want| (0 for two zero arrays)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    diff = np.abs(got - want).max()
    return float(diff / scale) if scale > 0 else float(diff)


def as_array(x) -> np.ndarray:
    """A torch tensor or array as numpy float64."""
    return np.asarray(x.detach().double().numpy() if hasattr(x, "detach") else x, np.float64)


def l2(got: dict, want: dict, start: dict | None = None) -> float:
    """||got - want|| / ||want|| over every entry of the shared paths of two flat trees (of
    their changes from `start` when given): a few entries whose updates are float noise
    (Adam steps every parameter by about its learning rate, whatever its gradient's size)
    weigh as little as they are many."""
    num = den = 0.0
    for path in set(got) & set(want):
        g, w = np.asarray(got[path], np.float64), np.asarray(want[path], np.float64)
        if start is not None:
            g, w = g - start[path], w - start[path]
        num += float(((g - w) ** 2).sum())
        den += float((w**2).sum())
    return (num / den) ** 0.5 if den > 0 else num**0.5


def adam_moments(flat_opt: dict) -> dict[str, dict[str, np.ndarray]]:
    """{'mu': {param path: array}, 'nu': ..., 'count': {group: int}} of optax Adam states in a
    flat tree (paths '<group...>/mu/<param path>')."""
    out: dict[str, dict] = {"mu": {}, "nu": {}, "count": {}}
    for path, value in flat_opt.items():
        parts = path.split("/")
        for name in ("mu", "nu"):
            if name in parts:
                i = parts.index(name)
                out[name]["/".join(parts[i + 1 :])] = value
        if parts[-1] == "count" and "hyperparams_states" not in parts:
            out["count"]["/".join(parts[:-1])] = int(value)
    return out


def torch_moments(optimizer, model) -> dict[str, dict]:
    """{'mu': {torch key: exp_avg}, 'nu': {torch key: exp_avg_sq}, 'step': {torch key: int}}
    of a torch Adam over `model`'s parameters (those it never stepped are absent)."""
    names = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, dict] = {"mu": {}, "nu": {}, "step": {}}
    for param, st in optimizer.state.items():
        if st:
            key = names[id(param)]
            out["mu"][key], out["nu"][key] = st["exp_avg"], st["exp_avg_sq"]
            out["step"][key] = int(st["step"])
    return out


def check_figures(figures: dict[str, tuple[float, float]], tolerances: dict[str, float]) -> None:
    """Each figure (mlgraph vs torch float32, torch float32 vs float64) against its tolerance:
    mlgraph within it, and torch's own float32 drift within a third of it (the tolerance is
    at least three times the noise that float32 alone makes). One message lists them all."""
    table = ", ".join(
        f"{k} {got:.2e} (float32 drift {drift:.2e}, tolerance {tolerances[k]:.0e})"
        for k, (got, drift) in figures.items()
    )
    assert set(figures) == set(tolerances), table
    assert all(got <= tolerances[k] for k, (got, _) in figures.items()), table
    assert all(drift <= tolerances[k] / 3 for k, (_, drift) in figures.items()), table

"""The Tiny RNN Zoo (the paper's section 5.2): a zoo of seq2seq GRUs trained on integer addition
(:mod:`tasks.zoo.addition`) and predictors of their test success rate from their weights.

* Zoo: :class:`ZooConfig` (and :data:`PRESETS`) fix everything; :func:`build` trains the zoo in
  chunks of models of one batch size (resuming from finished chunks; several processes can share
  a build), :func:`load_zoo` reads it back.
* Predictors of the success rate: :mod:`tasks.zoo.predictors`.
* :func:`measure_cost`: CPU time per model-step of the zoo's training and the build time it
  extrapolates to.

The command line is ``scripts/rnn_zoo.py`` (``build``, ``predict``, ``cost``); the measurements are
in docs/rnn_zoo.md.

Example:
  >>> from tasks.zoo import rnn_zoo
  >>> rnn_zoo.PRESETS["tiny"].num_models
  12
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.extras import pyplot
from tasks.zoo import addition

PyTree = Any

BATCH_SIZES = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo (saved as config.json next to it).

    Attributes:
      num_models: number of trained models (the paper: 10,000).
      hidden: GRU hidden size (the paper: 128).
      digits: operands have up to this many digits (the paper: 5).
      steps: Adam steps per model (the paper does not say).
      lr_min, lr_max: learning rates are log-uniform in [lr_min, lr_max].
      batch_sizes: each model's batch size is drawn uniformly from these.
      train_size, test_size: fixed training and test problem sets.
      chunk_size: models trained together (one vmapped program); the unit of resumption.
      seed: fixes the problems, every model's hyperparameters, seeds and the 80/10/10 split.
    """

    num_models: int = 1000
    hidden: int = 32
    digits: int = 3
    steps: int = 2000
    lr_min: float = 1e-4
    lr_max: float = 1e-2
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    train_size: int = 20000
    test_size: int = 1000
    chunk_size: int = 250
    seed: int = 0

    @property
    def task(self) -> addition.AdditionConfig:
        return addition.AdditionConfig(digits=self.digits, hidden=self.hidden)


PRESETS = {
    # Builds in about an hour on 2 CPU cores (see docs/rnn_zoo.md for the measurement).
    "default": ZooConfig(),
    # The paper's zoo size; the number of training steps is our choice (not in the paper).
    "paper": ZooConfig(num_models=10000, hidden=128, digits=5, steps=10000, test_size=2000,
                       chunk_size=500),
    # For tests and smoke runs.
    "tiny": ZooConfig(num_models=12, hidden=8, digits=2, steps=60, train_size=2000,
                      test_size=200, chunk_size=6),
}


def hyperparameters(cfg: ZooConfig) -> dict[str, np.ndarray]:
    """Per-model learning rate, batch size, seed and split (0 train, 1 val, 2 test)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_models
    lr = 10 ** rng.uniform(np.log10(cfg.lr_min), np.log10(cfg.lr_max), n)
    batch = rng.choice(np.asarray(cfg.batch_sizes), n)
    seeds = rng.integers(0, 2**31 - 1, n)
    split = np.zeros(n, np.int32)
    order = rng.permutation(n)
    n_train, n_val = int(round(0.8 * n)), int(round(0.1 * n))
    split[order[n_train:n_train + n_val]] = 1
    split[order[n_train + n_val:]] = 2
    return {"lr": lr.astype(np.float32), "batch_size": batch.astype(np.int32),
            "seed": seeds.astype(np.int64), "split": split}


def problem_sets(cfg: ZooConfig) -> tuple[addition.Problems, addition.Problems]:
    """The zoo's fixed training and test problems (seeds derived from the zoo seed)."""
    train_seed, test_seed = np.random.SeedSequence([cfg.seed, 1]).generate_state(2)
    return (addition.make_problems(cfg.task, int(train_seed), cfg.train_size),
            addition.make_problems(cfg.task, int(test_seed), cfg.test_size))


def chunks(cfg: ZooConfig, batch_size: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, model ids): models of one batch size, at most chunk_size per chunk."""
    out = []
    for b in cfg.batch_sizes:
        ids = np.flatnonzero(batch_size == b)
        for i, start in enumerate(range(0, len(ids), cfg.chunk_size)):
            out.append((f"b{b}_{i:04d}", ids[start:start + cfg.chunk_size]))
    return out


def assign_chunks(todo: list, batch_size: np.ndarray, workers: int) -> list[list]:
    """Split chunks between workers, balancing the cost models x batch size (longest first)."""
    loads, out = [0] * workers, [[] for _ in range(workers)]
    for name, ids in sorted(todo, key=lambda c: -len(c[1]) * int(batch_size[c[1][0]])):
        w = loads.index(min(loads))
        out[w].append((name, ids))
        loads[w] += len(ids) * int(batch_size[ids[0]])
    return out


def flat_params(params: PyTree) -> dict[str, np.ndarray]:
    """{'encoder/hn/bias': array, ...} (the zoo's on-disk layout, leading model axis)."""
    return {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_params(flat: dict[str, np.ndarray]) -> PyTree:
    """Inverse of :func:`flat_params`."""
    tree: dict = {}
    for name, x in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return tree


def _train_chunk(cfg: ZooConfig, ids: np.ndarray, hp: dict, train, test, log_every: int):
    task = cfg.task
    b = int(hp["batch_size"][ids[0]])
    state = addition.init_models(task, jnp.asarray(hp["seed"][ids], jnp.uint32))
    lrs = jnp.asarray(hp["lr"][ids])
    train_fn = jax.jit(addition.train_models, static_argnums=(0, 4, 5))
    losses = []
    done = 0
    while done < cfg.steps:
        k = min(log_every, cfg.steps - done)
        state, loss = train_fn(task, state, lrs, train, b, k, done)
        losses.append(np.asarray(loss))
        done += k
        print(f"    step {done}/{cfg.steps}: median train loss {np.median(losses[-1][-1]):.3f}",
              flush=True)
    success, test_loss = jax.jit(addition.evaluate_models, static_argnums=0)(
        task, state.params, test)
    losses = np.concatenate(losses)
    return {
        "ids": ids,
        "success": np.asarray(success),
        "test_loss": np.asarray(test_loss),
        # Mean over the last 10% of steps: less noisy than the last batch alone.
        "train_loss": losses[-max(1, cfg.steps // 10):].mean(0),
        **{f"params/{k}": v for k, v in flat_params(state.params).items()},
    }


def build(cfg: ZooConfig, out: Path, log_every: int = 500, worker: int = 0,
          workers: int = 1) -> dict[str, np.ndarray] | None:
    """Train the zoo into ``out`` (resuming from finished chunks) and return zoo.npz's arrays.

    With ``workers > 1``, this process trains only its share of the chunks (``assign_chunks``),
    so that several processes (one per core or device) share a build; the one that finds every
    chunk done writes zoo.npz, the others return None.
    """
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in [0, workers), got worker={worker}, workers={workers}")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg_dict = dataclasses.asdict(cfg)
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        saved["batch_sizes"] = tuple(saved["batch_sizes"])
        if saved != cfg_dict:
            diff = {k: (saved.get(k), v) for k, v in cfg_dict.items() if saved.get(k) != v}
            raise ValueError(f"{out} holds a zoo with another configuration (saved, asked): "
                             f"{diff}; use another --out or the same options")
    else:
        cfg_path.write_text(json.dumps(cfg_dict, indent=1) + "\n")
    hp = hyperparameters(cfg)
    train, test = problem_sets(cfg)
    chunk_dir = out / "chunks"
    chunk_dir.mkdir(exist_ok=True)
    t0 = time.time()
    todo = chunks(cfg, hp["batch_size"])
    print(f"zoo: {cfg.num_models} models in {len(todo)} chunks on {jax.devices()[0].platform}",
          flush=True)
    trained = 0
    for name, ids in assign_chunks(todo, hp["batch_size"], workers)[worker]:
        path = chunk_dir / f"{name}.npz"
        if path.exists():
            print(f"  chunk {name}: done earlier, skipped", flush=True)
            continue
        t = time.time()
        print(f"  chunk {name}: {len(ids)} models, batch {hp['batch_size'][ids[0]]}", flush=True)
        arrays = _train_chunk(cfg, ids, hp, train, test, log_every)
        tmp = chunk_dir / f"{name}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # a chunk file exists only when complete
        trained += len(ids)
        print(f"  chunk {name}: {time.time() - t:.1f} s, success rate median "
              f"{np.median(arrays['success']):.3f} max {arrays['success'].max():.3f}", flush=True)
    missing = [name for name, _ in todo if not (chunk_dir / f"{name}.npz").exists()]
    if missing:
        print(f"worker {worker}: done in {time.time() - t0:.1f} s; chunks {missing} belong to "
              "other workers: run build again when they finish to write zoo.npz", flush=True)
        return None
    zoo = gather(cfg, out, hp)
    np.savez_compressed(out / "zoo.npz", **zoo)
    elapsed = time.time() - t0
    per_model = f" ({elapsed / trained:.3f} s per model)" if trained else ""
    print(f"built {out / 'zoo.npz'}: {trained} models trained in this run in {elapsed:.1f} s"
          f"{per_model}", flush=True)
    return zoo


def gather(cfg: ZooConfig, out: Path, hp: dict) -> dict[str, np.ndarray]:
    """Concatenate the chunk files into arrays ordered by model id."""
    zoo: dict[str, np.ndarray] = {}
    parts = [dict(np.load(out / "chunks" / f"{name}.npz")) for name, _ in chunks(
        cfg, hp["batch_size"])]
    ids = np.concatenate([p["ids"] for p in parts])
    order = np.argsort(ids)
    if not np.array_equal(ids[order], np.arange(cfg.num_models)):
        raise ValueError(f"chunks in {out} do not cover models 0..{cfg.num_models - 1}")
    for key in parts[0]:
        if key != "ids":
            zoo[key] = np.concatenate([p[key] for p in parts])[order]
    zoo.update(hp)
    return zoo


def load_zoo(path: Path) -> tuple[ZooConfig, dict[str, np.ndarray], PyTree]:
    """(config, arrays of zoo.npz, params pytree with a leading model axis)."""
    path = Path(path)
    saved = json.loads((path / "config.json").read_text())
    saved["batch_sizes"] = tuple(saved["batch_sizes"])
    cfg = ZooConfig(**saved)
    with np.load(path / "zoo.npz") as f:
        zoo = dict(f)
    params = unflatten_params({k[len("params/"):]: v for k, v in zoo.items()
                               if k.startswith("params/")})
    return cfg, zoo, params


def save_histogram(success: np.ndarray, path: Path, title: str) -> np.ndarray:
    """PNG histogram of success rates; returns the counts in 10 bins of [0, 1]."""
    plt = pyplot()

    counts, edges = np.histogram(success, bins=10, range=(0.0, 1.0))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(success, bins=20, range=(0.0, 1.0))
    ax.set_xlabel("test success rate")
    ax.set_ylabel("models")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return counts


def measure_cost(cfg: ZooConfig, probe_steps: int = 100) -> dict[int, float]:
    """Measure the training cost per model-step and extrapolate the build (prints a benchmark
    table); returns the CPU seconds per model-step for each batch size."""
    import resource

    hp = hyperparameters(cfg)
    train, _ = problem_sets(cfg)
    task = cfg.task
    m = min(cfg.chunk_size, cfg.num_models)
    train_fn = jax.jit(addition.train_models, static_argnums=(0, 4, 5))

    def cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    print(f"{m} models x {probe_steps} steps per batch size on "
          f"{jax.devices()[0].platform}; CPU time counts all threads of this process")
    print("| batch | compile+first wall s | CPU ms / model-step | wall ms / model-step |")
    print("|---|---|---|---|")
    cost = {}
    for b in cfg.batch_sizes:
        state = addition.init_models(task, jnp.arange(m, dtype=jnp.uint32))
        lrs = jnp.full((m,), 1e-3)
        t = time.time()
        state, loss = train_fn(task, state, lrs, train, b, probe_steps, 0)
        loss.block_until_ready()
        first = time.time() - t
        t, c = time.time(), cpu_seconds()
        state, loss = train_fn(task, state, lrs, train, b, probe_steps, probe_steps)
        loss.block_until_ready()
        wall, cpu = time.time() - t, cpu_seconds() - c
        cost[b] = cpu / (m * probe_steps)
        per_step = 1e3 / (m * probe_steps)
        print(f"| {b} | {first:.1f} | {cpu * per_step:.3f} | {wall * per_step:.3f} |")
    todo = chunks(cfg, hp["batch_size"])
    for workers in (1, 2):
        shares = assign_chunks(todo, hp["batch_size"], workers)
        per_worker = [sum(len(ids) * cost[int(hp["batch_size"][ids[0]])] * cfg.steps
                          for _, ids in share) for share in shares]
        print(f"extrapolated build, {workers} worker(s): CPU seconds per worker "
              f"{[round(x) for x in per_worker]} -> about {max(per_worker) / 60:.0f} min on "
              f"{workers} dedicated core(s) if each worker gets one core")
    return cost

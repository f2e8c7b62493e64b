"""The Tiny RNN Zoo (the paper's section 5.2): a zoo of seq2seq GRUs trained on integer addition
(:mod:`tasks.zoo.addition`) and predictors of their test success rate from their weights.

* Zoo: :class:`ZooConfig` (and :data:`PRESETS`) fix everything; :func:`build` trains the zoo in
  chunks of models of one batch size (resuming from finished chunks; several processes can share
  a build), :func:`load_zoo` reads it back.
* Predictors: :class:`PredictConfig`, :func:`train_predictor` (STATNN, UNF or Deep Set; the epoch
  with the best validation Kendall tau is kept), :func:`evaluate_predictions`.
* :func:`measure_cost`: CPU time per model-step of the zoo's training and the build time it
  extrapolates to.

The command line is ``scripts/rnn_zoo.py`` (``build``, ``predict``, ``cost``); the measurements are
in docs/rnn_zoo.md.

Example:
  >>> from tasks.zoo import rnn_zoo
  >>> rnn_zoo.PRESETS["tiny"].num_models
  12
  >>> rnn_zoo.evaluate_predictions([0.1, 0.5, 0.9], [0.2, 0.4, 0.8])["kendall_tau"]
  1.0
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import DeepSetLinear, InvariantUNF, UNFLinear, statnn_features
from learned_opt.extras import import_optional, pyplot
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


# ---------------------------------------------------------------------------------------------
# Predictors of the success rate from the weights.

METHODS = ("statnn", "unf", "deepset")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """A predictor and its training (defaults: the paper's settings).

    Attributes:
      method: "statnn" (statistics -> MLP), "unf" (InvariantUNF) or "deepset" (InvariantUNF with
        DeepSetLinear layers).
      epochs: training epochs; the epoch with the best validation Kendall tau is kept.
      batch_size: models per step (an incomplete last batch of an epoch is dropped).
      lr: Adam learning rate.
      seed: predictor initialisation and batch order.
      statnn_layers, statnn_width: the STATNN MLP (hidden layers; one more layer gives the logit).
      channels, layers, head_width: the weight-space predictors: ``layers`` equivariant layers of
        ``channels`` channels, invariant pooling, two hidden layers of ``head_width``, a logit.
    """

    method: str = "unf"
    epochs: int = 10
    batch_size: int = 10
    lr: float = 1e-3
    seed: int = 0
    statnn_layers: int = 5
    statnn_width: int = 600
    channels: int = 16
    layers: int = 3
    head_width: int = 512

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


class StatMLP(nn.Module):
    """STATNN's predictor: an MLP on the (standardised) statistics, ReLU, one logit."""

    layers: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.layers):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)[..., 0]


def make_inputs(pcfg: PredictConfig, params: PyTree, train_ids: np.ndarray) -> PyTree:
    """The predictor's inputs for every model (leading model axis), normalised on train_ids.

    STATNN: statistics of every tensor, standardised per feature with the training split's
    mean and standard deviation. UNF / Deep Set: the weights with a channel axis of 1, each
    tensor divided by one scalar (its standard deviation over the training split's models and
    entries) -- one number per tensor, so the normalisation commutes with every permutation.
    """
    if pcfg.method == "statnn":
        feats = np.asarray(jax.jit(jax.vmap(statnn_features))(params))
        mu, sd = feats[train_ids].mean(0), feats[train_ids].std(0)
        return (feats - mu) / np.where(sd > 0, sd, 1.0)

    def scale(x):
        sd = float(np.std(x[train_ids]))
        return (x / (sd if sd > 0 else 1.0))[..., None].astype(np.float32)

    return jax.tree.map(scale, params)


def make_predictor(pcfg: PredictConfig, spec: PyTree):
    """(flax module, apply(variables, inputs with a leading batch axis) -> logits [batch])."""
    if pcfg.method == "statnn":
        model = StatMLP(pcfg.statnn_layers, pcfg.statnn_width)
        return model, model.apply
    layer_cls = {"unf": UNFLinear, "deepset": DeepSetLinear}[pcfg.method]
    model = InvariantUNF(pcfg.channels, pcfg.layers, 1,
                         head_features=(pcfg.head_width, pcfg.head_width), layer_cls=layer_cls)

    def apply_fn(variables, x):
        return jax.vmap(lambda one: model.apply(variables, one, spec)[0])(x)

    return model, apply_fn


def init_predictor(pcfg: PredictConfig, model, inputs: PyTree, spec: PyTree, key: jax.Array):
    one = jax.tree.map(lambda x: x[0], inputs)
    if pcfg.method == "statnn":
        return model.init(key, one)
    return model.init(key, one, spec)


def evaluate_predictions(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Kendall's tau (tau-b, ties handled) and R^2 of predicted against true success rates."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred and true must be 1-D of the same length, got {pred.shape} and "
                         f"{true.shape}")
    tau = import_optional("scipy.stats", "tasks").kendalltau(pred, true).statistic
    ss_res = np.sum((true - pred) ** 2)
    ss_tot = np.sum((true - true.mean()) ** 2)
    return {"kendall_tau": float(tau), "r2": float(1.0 - ss_res / ss_tot)}


def train_predictor(pcfg: PredictConfig, params: PyTree, labels: np.ndarray, split: np.ndarray,
                    spec: PyTree, log=print) -> dict[str, Any]:
    """Train on split 0, keep the epoch with the best validation tau (split 1), test on split 2.

    Returns a dict with the test metrics, the validation tau of the kept epoch, the epoch, and
    the test predictions (``"test_pred"``, ``"test_true"``).
    """
    train_ids, val_ids, test_ids = (np.flatnonzero(split == i) for i in range(3))
    if len(train_ids) < pcfg.batch_size:
        raise ValueError(f"{len(train_ids)} training models, fewer than one batch "
                         f"({pcfg.batch_size})")
    inputs = make_inputs(pcfg, params, train_ids)
    model, apply_fn = make_predictor(pcfg, spec)
    key = jax.random.key(pcfg.seed)
    variables = init_predictor(pcfg, model, inputs, spec, key)
    tx = optax.adam(pcfg.lr)
    opt_state = tx.init(variables)
    labels = np.asarray(labels, np.float32)

    @jax.jit
    def train_step(variables, opt_state, x, y):
        def loss_fn(v):
            return optax.sigmoid_binary_cross_entropy(apply_fn(v, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    predict_batch = jax.jit(lambda v, x: jax.nn.sigmoid(apply_fn(v, x)))

    def predict(variables, ids):
        out = [predict_batch(variables, jax.tree.map(lambda a: a[ids[i:i + 100]], inputs))
               for i in range(0, len(ids), 100)]
        return np.concatenate([np.asarray(o) for o in out])

    rng = np.random.default_rng(pcfg.seed)
    # The first epoch is kept whatever its tau (NaN when the validation labels tie, e.g. in a
    # small zoo), later ones only when they are better.
    best = {"val_kendall_tau": -np.inf, "best_epoch": 0}
    n_batches = len(train_ids) // pcfg.batch_size
    for epoch in range(1, pcfg.epochs + 1):
        t = time.time()
        order = rng.permutation(train_ids)
        losses = []
        for i in range(n_batches):
            ids = order[i * pcfg.batch_size:(i + 1) * pcfg.batch_size]
            batch = jax.tree.map(lambda a, ids=ids: a[ids], inputs)
            variables, opt_state, loss = train_step(variables, opt_state, batch, labels[ids])
            losses.append(float(loss))
        val = evaluate_predictions(predict(variables, val_ids), labels[val_ids])
        log(f"  epoch {epoch}: train BCE {np.mean(losses):.4f}, val tau {val['kendall_tau']:.4f}"
            f", val R2 {val['r2']:.4f} ({time.time() - t:.1f} s)")
        if best["best_epoch"] == 0 or val["kendall_tau"] > best["val_kendall_tau"]:
            best = {"val_kendall_tau": val["kendall_tau"], "best_epoch": epoch,
                    "variables": variables}
    test_pred = predict(best.pop("variables"), test_ids)
    return {**evaluate_predictions(test_pred, labels[test_ids]), **best,
            "test_pred": test_pred, "test_true": labels[test_ids],
            "num_predictor_params": int(sum(x.size for x in jax.tree.leaves(variables)))}


def save_scatter(pred: np.ndarray, true: np.ndarray, path: Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(true, pred, s=8, alpha=0.6)
    hi = max(float(np.max(true)), float(np.max(pred)), 1e-3) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("true test success rate")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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

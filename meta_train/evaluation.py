"""Evaluation: train fresh task networks with optax optimizers, learned ones included.

Every optimizer is an optax ``GradientTransformation`` (a learned one through
``lopt.as_optax(meta_params)`` or ``learned_opt.load_optax``); every run of a given seed sees the
same initialisation and the same batches, whatever the optimizer. Hand-designed baselines get the
learning rate from their grid with the lowest final training loss on *tuning* seeds, which are
disjoint from the reported seeds.

Example:
  >>> import optax, tasks
  >>> task = tasks.get_task("mlp_fmnist_tiny")                               # doctest: +SKIP
  >>> runs = train_runs(task, optax.adam(1e-2), seeds=[0, 1], steps=50)      # doctest: +SKIP
  >>> runs.losses.shape                                                      # doctest: +SKIP
  (2, 50)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meta_train.inner import over_members

EVAL_SEEDS = (100, 101, 102, 103, 104)  # never used by meta-training (it folds keys from seed)
TUNE_SEEDS = (200, 201, 202)


class Runs(NamedTuple):
    """Training runs of one optimizer over several seeds (numpy arrays)."""

    losses: np.ndarray  # [S, T] minibatch training loss before each step
    final_train: np.ndarray  # [S] loss of the final parameters on the training split
    final_test: np.ndarray  # [S] loss of the final parameters on the test split
    test_accuracy: np.ndarray  # [S] accuracy on the test split (NaN if the task has none)


def seed_key(seed: int) -> jax.Array:
    """Key of evaluation seed ``seed``: task init and batches both derive from it."""
    return jax.random.PRNGKey(seed)


def _train_one(task, tx, key, steps):
    k_init, k_data = jax.random.split(key)
    params = task.init(k_init)
    state = tx.init(params)

    def body(carry, s):
        params, state = carry
        batch = task.sample_batch(jax.random.fold_in(k_data, s), "train")
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(body, (params, state), jnp.arange(steps))
    return losses, params


def _final_metrics(task, params, max_examples):
    train = task.evaluate(params, "train", max_examples=max_examples)
    test = task.evaluate(params, "test", max_examples=max_examples)
    return train["loss"], test["loss"], test.get("accuracy", jnp.nan)


def train_runs(task, tx: optax.GradientTransformation, seeds: Sequence[int], steps: int,
               max_eval_examples: int | None = 10_000, member_loop: str = "auto") -> Runs:
    """Train one fresh network per seed for ``steps`` steps with ``tx``, all seeds in one jit
    (``member_loop``: batched or one after another, ``meta_train.inner.MEMBER_LOOPS``)."""
    keys = jnp.stack([seed_key(s) for s in seeds])

    @jax.jit
    def run(keys):
        losses, params = over_members(lambda k: _train_one(task, tx, k, steps), keys,
                                      member_loop)
        metrics = jax.vmap(lambda p: _final_metrics(task, p, max_eval_examples))(params)
        return losses, metrics

    losses, (tr, te, acc) = jax.device_get(run(keys))
    return Runs(np.asarray(losses), np.asarray(tr), np.asarray(te), np.asarray(acc))


def tail_loss(losses: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Mean minibatch loss over the last ``frac`` of the steps (per seed); NaN counts as inf."""
    n = max(1, int(round(losses.shape[-1] * frac)))
    tail = np.where(np.isfinite(losses[..., -n:]), losses[..., -n:], np.inf)
    return tail.mean(axis=-1)


def tune_learning_rate(task, make_tx: Callable[[Any], optax.GradientTransformation],
                       grid: Sequence[float], seeds: Sequence[int], steps: int,
                       member_loop: str = "auto") -> tuple[float, dict[float, float]]:
    """Best learning rate of ``grid`` by final training loss (last 10% of steps) on ``seeds``.

    The whole grid runs in one jit (every learning rate and seed; ``member_loop`` as in
    ``train_runs``).

    Returns:
      ``(best_lr, {lr: mean tail loss})``.
    """
    keys = jnp.stack([seed_key(s) for s in seeds])

    @jax.jit
    def run(lrs):
        def per_lr(lr):
            return over_members(lambda k: _train_one(task, make_tx(lr), k, steps)[0], keys,
                                member_loop)

        return over_members(per_lr, lrs, member_loop)

    losses = np.asarray(jax.device_get(run(jnp.asarray(grid, jnp.float32))))
    scores = {float(lr): float(tail_loss(losses[i]).mean()) for i, lr in enumerate(grid)}
    best = min(scores, key=lambda lr: scores[lr])
    return best, scores


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over the first axis."""
    x = np.asarray(x, dtype=np.float64)
    se = x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return float(x.mean()), float(se)


def summarize(results: dict[str, Runs], extra: dict[str, dict] | None = None) -> list[dict]:
    """One row per optimizer: mean and standard error of the final losses."""
    rows = []
    for name, r in results.items():
        row = {"optimizer": name}
        for field, values in (("train_loss_at_T", tail_loss(r.losses, 0.0)),
                              ("final_train_loss", r.final_train),
                              ("final_test_loss", r.final_test),
                              ("test_accuracy", r.test_accuracy)):
            m, se = mean_se(values)
            row[field], row[field + "_se"] = m, se
        row |= (extra or {}).get(name, {})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of ``summarize`` rows."""
    cols = [("optimizer", "optimizer"), ("final_train_loss", "train loss (full split)"),
            ("final_test_loss", "test loss"), ("test_accuracy", "test acc")]
    lines = [" | ".join(f"{title:>24}" if i else f"{title:<28}" for i, (_, title) in
                        enumerate(cols))]
    for row in rows:
        cells = [f"{row['optimizer']:<28}"]
        for key, _ in cols[1:]:
            cells.append(f"{row[key]:>15.4f} +- {row[key + '_se']:.4f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis (same length)."""
    if window <= 1:
        return x
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(window, 0)], mode="edge"), axis=-1)
    return (c[..., window:] - c[..., :-window]) / window


def plot_curves(results: dict[str, Runs], path: str | Path, title: str = "") -> Path:
    """Training-loss curves, mean and standard error over seeds, smoothed; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        losses = np.where(np.isfinite(r.losses), r.losses, np.nan)
        curve = smooth(losses, max(1, losses.shape[1] // 25))
        mean = np.nanmean(curve, axis=0)
        se = np.nanstd(curve, axis=0, ddof=1) / math.sqrt(curve.shape[0]) if len(curve) > 1 \
            else np.zeros_like(mean)
        steps = np.arange(1, len(mean) + 1)
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, mean - se, mean + se, alpha=0.25)
    ax.set_xlabel("inner step")
    ax.set_ylabel("training loss (minibatch, smoothed)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(rows: list[dict], out_dir: str | Path, info: dict | None = None) -> None:
    """``summary.json`` (rows and ``info``) and ``summary.csv`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({"info": info or {}, "rows": rows},
                                                     indent=2))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def compare(task, learned: dict[str, optax.GradientTransformation], *, steps: int,
            baselines: Sequence[str] = ("sgdm", "adam"), seeds: Sequence[int] = EVAL_SEEDS,
            tune_seeds: Sequence[int] = TUNE_SEEDS, grids: dict | None = None,
            out_dir: str | Path | None = None, title: str = "", wandb_mode: str = "disabled",
            info: dict | None = None, log: Callable[[str], None] = print) -> tuple[list, Path]:
    """Evaluate learned optimizers against tuned hand-designed baselines on unseen seeds.

    Args:
      task: the task.
      learned: display name -> optax transformation (e.g. ``lopt.as_optax(meta)``).
      steps: inner steps T of every run.
      baselines: names in ``learned_opt.hand_designed.BASELINES`` to tune and add.
      seeds: reported seeds; tune_seeds: seeds that choose the baselines' learning rates.
      grids: learning-rate grids (default ``learned_opt.hand_designed.LR_GRIDS``).
      out_dir: where ``summary.json``, ``summary.csv``, ``curves.png`` (and wandb) go.
      wandb_mode: ``online``, ``offline`` or ``disabled``.
      info: extra facts stored in summary.json and the wandb config.

    Returns:
      ``(rows, plot_path)``.
    """
    from learned_opt import hand_designed

    if set(seeds) & set(tune_seeds):
        raise ValueError(
            f"tuning seeds {sorted(tune_seeds)} overlap reported seeds {sorted(seeds)}"
        )
    grids = grids or hand_designed.LR_GRIDS
    results, extra = {}, {}
    for name, tx in learned.items():
        log(f"evaluating {name} on seeds {list(seeds)} for {steps} steps")
        results[name] = train_runs(task, tx, seeds, steps)
    for base in baselines:
        make = hand_designed.BASELINES[base]
        best, scores = tune_learning_rate(task, make, grids[base], tune_seeds, steps)
        log(f"tuned {base}: lr {best:g} (tail training loss by lr on tuning seeds: "
            + ", ".join(f"{lr:g}: {s:.4f}" for lr, s in scores.items()) + ")")
        name = f"{base} (tuned lr {best:g})"
        results[name] = train_runs(task, make(best), seeds, steps)
        extra[name] = {"lr": best, "lr_grid_scores": scores}
    rows = summarize(results, extra)
    out_dir = Path(out_dir or ".")
    plot = plot_curves(results, out_dir / "curves.png", title)
    info = (info or {}) | {"steps": steps, "seeds": list(seeds), "tune_seeds": list(tune_seeds)}
    write_summary(rows, out_dir, info)
    if wandb_mode != "disabled":
        _log_wandb(results, rows, plot, out_dir, wandb_mode, info)
    return rows, plot


def _log_wandb(results, rows, plot, out_dir, mode, info):
    import wandb

    from meta_train.tracking import usable_wandb_mode

    mode = usable_wandb_mode(mode)
    run = wandb.init(project="learned-opt", dir=str(out_dir), mode=mode, job_type="eval",
                     config=info, name=f"eval-{Path(out_dir).name}")
    means = {name: np.nanmean(np.where(np.isfinite(r.losses), r.losses, np.nan), axis=0)
             for name, r in results.items()}
    for i in range(len(next(iter(means.values())))):
        run.log({f"train_loss/{name}": float(m[i]) for name, m in means.items()}, step=i)
    cols = [k for k in rows[0] if k != "lr_grid_scores"]
    table = wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in rows])
    run.log({"summary": table, "curves": wandb.Image(str(plot))})
    run.finish()

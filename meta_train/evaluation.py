"""The evaluation engine: tune candidates on tuning seeds, train them on evaluation seeds, report.

A *candidate* is an optax optimizer to evaluate: a ``GradientTransformation`` used as given, or a
``Candidate(make, grid)`` whose factory ``make`` is called with keywords: one value per name of
``grid`` (tuned: the grid point with the lowest tail training loss on the tuning seeds), plus
``steps`` (the horizon) and ``task`` when ``make`` names them. So a learned optimizer at its
default is ``Candidate(lambda steps: lopt.as_optax(meta, num_steps=steps))``, and one with its
learning rate tuned on AdamW's grid is ``Candidate(lambda lr, steps: optax.chain(scale_by_x(...),
optax.scale_by_learning_rate(schedule(lr, steps))), {"lr": LR_GRID})``. The built-in baselines
(``BASELINES``) sit at the end of this module with their grids.

Seed policy: every run of seed ``s`` starts from ``task.init`` and draws its batches from
``seed_key(s)``, whatever the optimizer, so candidates are compared on the same networks and
batches (paired over seeds: ``paired``). Evaluation seeds (``EVAL_SEEDS``) are never used by
meta-training; tuning seeds (``TUNE_SEEDS``) must be disjoint from them. A grid point whose
training loss is ever NaN or infinite on a tuning seed has score ``inf`` and is never chosen;
ties go to the first point in grid order.

Example (seconds):
  >>> import optax, tasks
  >>> task = tasks.get_task("mlp_fmnist_tiny")                               # doctest: +SKIP
  >>> report = evaluate(task, {"adam": BASELINES["adam"], "sgd": optax.sgd(0.1)},
  ...                   horizons=[50], seeds=[100, 101], tune_seeds=[200])   # doctest: +SKIP
  >>> [(r["optimizer"], r["hparams"]) for r in report.rows]                  # doctest: +SKIP
  [('adam', {'lr': 0.01}), ('sgd', {})]
"""

from __future__ import annotations

import csv
import inspect
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import hand_designed
from learned_opt.extras import pyplot
from meta_train.inner import over_members, step_keys, train_steps

EVAL_SEEDS = (100, 101, 102, 103, 104)  # never used by meta-training (it folds keys from seed)
TUNE_SEEDS = (200, 201, 202)
TAIL = 0.1  # tuning score: mean minibatch training loss over the last 10% of the steps


class Candidate(NamedTuple):
    """An optimizer to evaluate: ``make(**point, [steps=T], [task=task])`` for each point of
    ``grid`` (``{name: values}``, product of the values; empty: one fixed optimizer).

    ``trace``: the grid's values reach ``make`` as traced scalars and the whole grid trains in
    one jit; ``False`` (or a factory that turns out to branch on a value) gives ``make`` Python
    numbers, one compilation per point.
    """

    make: Callable[..., optax.GradientTransformation]
    grid: Mapping[str, Sequence[float]] = {}
    trace: bool = True


def as_candidate(x) -> Candidate:
    """``x`` as a ``Candidate``: a ``GradientTransformation`` (fixed), a factory (fixed, called
    with ``steps`` / ``task``), a ``(make, grid)`` pair, or a ``Candidate``."""
    if isinstance(x, Candidate):
        return x
    if isinstance(x, optax.GradientTransformation):
        return Candidate(lambda: x)
    if callable(x):
        return Candidate(x)
    return Candidate(*x)


def build(candidate: Candidate, task, steps: int, **point) -> optax.GradientTransformation:
    """The candidate's optimizer at grid point ``point`` for ``steps`` steps on ``task``."""
    names = inspect.signature(candidate.make).parameters
    context = {k: v for k, v in (("steps", steps), ("task", task)) if k in names}
    return candidate.make(**point, **context)


def grid_points(grid: Mapping[str, Sequence[float]]) -> list[dict]:
    """Every point of ``grid`` in order (the last name varies fastest); ``[{}]`` when empty."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


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
    params, _, losses = train_steps(task, tx.update, params, tx.init(params),
                                    step_keys(k_data, 0, steps))
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


def tail_loss(losses: np.ndarray, frac: float = TAIL) -> np.ndarray:
    """Mean minibatch loss over the last ``frac`` of the steps (per seed); NaN counts as inf."""
    n = max(1, int(round(losses.shape[-1] * frac)))
    tail = np.where(np.isfinite(losses[..., -n:]), losses[..., -n:], np.inf)
    return tail.mean(axis=-1)


def score(losses: np.ndarray) -> float:
    """Tuning score of ``[seeds, T]`` losses: mean ``tail_loss``; ``inf`` if any loss of any
    seed is NaN or infinite (a diverged run is never chosen)."""
    return float(tail_loss(losses).mean()) if np.isfinite(losses).all() else math.inf


def _grid_losses(task, candidate, points, seeds, steps, member_loop) -> np.ndarray:
    """``[points, seeds, T]`` minibatch losses of every grid point on ``seeds``."""
    keys = jnp.stack([seed_key(s) for s in seeds])

    def point_runs(point):
        tx = build(candidate, task, steps, **point)
        return over_members(lambda k: _train_one(task, tx, k, steps)[0], keys, member_loop)

    if candidate.trace:
        stacked = {k: jnp.asarray([p[k] for p in points], jnp.float32) for k in candidate.grid}
        try:
            return np.asarray(jax.device_get(jax.jit(
                lambda xs: over_members(point_runs, xs, member_loop))(stacked)))
        except jax.errors.ConcretizationTypeError:  # the factory needs Python numbers
            pass
    return np.stack([jax.device_get(jax.jit(lambda: point_runs(p))()) for p in points])


def tune(task, candidate: Candidate, seeds: Sequence[int], steps: int,
         member_loop: str = "auto") -> tuple[dict | None, list[dict]]:
    """The grid point of ``candidate`` with the lowest ``score`` on ``seeds`` at ``steps``.

    Returns ``(best point or None when every point diverged, [point | {"score"}] in grid
    order)``; ties: the first point.
    """
    points = grid_points(candidate.grid)
    losses = _grid_losses(task, candidate, points, seeds, steps, member_loop)
    scores = [p | {"score": score(x)} for p, x in zip(points, losses, strict=True)]
    finite = [i for i, s in enumerate(scores) if math.isfinite(s["score"])]
    if not finite:
        return None, scores
    best = min(finite, key=lambda i: scores[i]["score"])  # min keeps the first of equals
    return points[best], scores


class Result(NamedTuple):
    """One candidate at one horizon: its runs on the evaluation seeds and how it was chosen."""

    runs: Runs | None  # None when every grid point diverged on the tuning seeds
    hparams: dict | None  # the chosen grid point ({} for a fixed candidate)
    grid_scores: list[dict]  # [point | {"score"}] on the tuning seeds ([] when fixed)


def run_candidate(task, candidate, steps: int, seeds: Sequence[int],
                  tune_seeds: Sequence[int] = TUNE_SEEDS, member_loop: str = "auto",
                  log: Callable[[str], None] = print, name: str = "") -> Result:
    """Tune ``candidate`` on ``tune_seeds`` (if it has a grid), then train it on ``seeds``."""
    candidate = as_candidate(candidate)
    check_seeds(seeds, tune_seeds)
    point, scores = {}, []
    if candidate.grid:
        point, scores = tune(task, candidate, tune_seeds, steps, member_loop)
        log(f"tuned {name} at T={steps} on seeds {list(tune_seeds)}: {point} (tail training "
            "loss: " + ", ".join(_point_text(s) for s in scores) + ")")
        if point is None:
            log(f"every grid point of {name} diverged at T={steps}: not evaluated")
            return Result(None, None, scores)
    runs = train_runs(task, build(candidate, task, steps, **point), seeds, steps,
                      member_loop=member_loop)
    return Result(runs, point, scores)


def check_seeds(seeds: Sequence[int], tune_seeds: Sequence[int]) -> None:
    """``ValueError`` unless the evaluation and tuning seeds are disjoint."""
    if set(seeds) & set(tune_seeds):
        raise ValueError(
            f"tuning seeds {sorted(tune_seeds)} overlap reported seeds {sorted(seeds)}")


def _point_text(point: dict) -> str:
    return " ".join(f"{k} {v:g}" for k, v in point.items() if k != "score") + \
        f": {point['score']:.4f}"


class Report(NamedTuple):
    """What ``evaluate`` returns: one row per (horizon, candidate) and the runs behind them."""

    rows: list[dict]
    runs: dict[tuple[int, str], Runs]  # (horizon, candidate name) -> runs (diverged: absent)

    def paired(self, a: str, b: str, horizon: int, field: str = "final_train") -> dict:
        """``paired_difference`` of candidates ``a`` minus ``b`` at ``horizon``."""
        return paired_difference(getattr(self.runs[horizon, a], field),
                                 getattr(self.runs[horizon, b], field))


def evaluate(task, candidates: Mapping[str, Any], horizons: Sequence[int],
             seeds: Sequence[int] = EVAL_SEEDS, tune_seeds: Sequence[int] = TUNE_SEEDS, *,
             out_dir: str | Path | None = None, title: str = "", info: dict | None = None,
             member_loop: str = "auto", wandb_mode: str = "disabled",
             log: Callable[[str], None] = print) -> Report:
    """Every candidate at every horizon: tuned per horizon on ``tune_seeds``, trained on
    ``seeds`` (same initialisations and batches for every candidate).

    Args:
      task: anything with ``init``, ``loss``, ``sample_batch``, ``evaluate`` (``tasks.base``).
      candidates: display name -> ``Candidate`` (or what ``as_candidate`` accepts).
      horizons: inner steps T of the runs.
      out_dir: if given, ``summary.json`` (``info`` and the rows), ``summary.csv``,
        ``curves.json`` and ``curves.png`` (one panel per horizon) are written there.
      wandb_mode: ``online`` / ``offline`` also log the curves and the table to wandb.

    Returns:
      A ``Report``: rows ``{"task", "horizon", "optimizer", "hparams", "grid_scores"}`` plus
      ``summarize_runs``' fields (mean and standard error of the final training loss on the
      full training split, test loss, test accuracy), and the runs (curves, per-seed values).
    """
    check_seeds(seeds, tune_seeds)
    candidates = {name: as_candidate(c) for name, c in candidates.items()}
    rows, runs = [], {}
    for steps in horizons:
        for name, cand in candidates.items():
            res = run_candidate(task, cand, steps, seeds, tune_seeds, member_loop, log, name)
            row = dict(task=getattr(task, "name", str(task)), horizon=steps, optimizer=name,
                       hparams=res.hparams, grid_scores=res.grid_scores)
            if res.runs is not None:
                runs[steps, name] = res.runs
                row |= summarize_runs(res.runs)
            rows.append(row)
    report = Report(rows, runs)
    if out_dir is not None:
        info = (info or {}) | dict(horizons=list(horizons), seeds=list(seeds),
                                   tune_seeds=list(tune_seeds))
        write_report(report, out_dir, title, info, wandb_mode)
    return report


# ---------------------------------------------------------------- statistics

def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over the first axis."""
    x = np.asarray(x, dtype=np.float64)
    se = x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return float(x.mean()), float(se)


# Reported field -> the ``Runs`` field it summarises.
RESULT_FIELDS = {"final_train_loss": "final_train", "final_test_loss": "final_test",
                 "test_accuracy": "test_accuracy"}


def summarize_runs(runs: Runs) -> dict:
    """Mean and standard error of each ``RESULT_FIELDS`` entry, the last minibatch loss
    (``train_loss_at_T``), the per-seed final training losses and the diverged seeds."""
    row = {}
    for field, values in (("train_loss_at_T", tail_loss(runs.losses, 0.0)),
                          *((f, getattr(runs, s)) for f, s in RESULT_FIELDS.items())):
        m, se = mean_se(values)
        row[field], row[field + "_se"] = m, se
    row["per_seed_final_train_loss"] = [float(x) for x in runs.final_train]
    row["diverged_seeds"] = int(np.sum(~np.isfinite(runs.final_train)))
    return row


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-seed ``a - b`` (same seeds, so the same networks and batches): mean, standard error
    and ``verdict`` (lower is better, as for losses)."""
    m, se = mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return dict(mean=m, se=se, verdict=verdict(m, se))


def paired_text(report: Report, a: str, b: str, horizon: int) -> str:
    """One sentence: ``a`` against ``b`` on the final training loss, paired over the seeds."""
    d = report.paired(a, b, horizon)
    return (f"{a} is {d['verdict']} {b} at T={horizon} (final training loss, paired difference "
            f"{d['mean']:+.4f} +- {d['se']:.4f} over {len(report.runs[horizon, a].final_train)} "
            "seeds)")


def verdict(difference: float, se: float, k: float = 2.0) -> str:
    """``better than`` / ``WORSE than`` when a loss difference is beyond ``k`` standard errors,
    else ``within noise of``."""
    if difference < -k * se:
        return "better than"
    return "WORSE than" if difference > k * se else "within noise of"


# ---------------------------------------------------------------- curves, tables, files

def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis (same length)."""
    if window <= 1:
        return x
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(window, 0)], mode="edge"), axis=-1)
    return (c[..., window:] - c[..., :-window]) / window


def curve(losses: np.ndarray, points: int = 200) -> dict:
    """Mean and standard error over seeds of smoothed minibatch losses, ``points`` samples."""
    losses = np.where(np.isfinite(losses), losses, np.nan)
    sm = smooth(losses, max(1, losses.shape[1] // 25))
    idx = np.unique(np.linspace(0, sm.shape[1] - 1, points).astype(int))
    mean = np.nanmean(sm[:, idx], axis=0)
    se = np.nanstd(sm[:, idx], axis=0, ddof=1) / math.sqrt(len(sm)) if len(sm) > 1 else 0 * mean
    return dict(step=(idx + 1).tolist(), mean=mean.tolist(), se=np.asarray(se).tolist())


def curves(report: Report) -> dict:
    """``{"T=<steps>": {name: curve}}`` of every run in ``report``."""
    out: dict = {}
    for (steps, name), runs in report.runs.items():
        out.setdefault(f"T={steps}", {})[name] = curve(runs.losses)
    return out


def plot_curves(curves: dict, path: str | Path, title: str = "",
                hide: Sequence[str] = ()) -> Path:
    """One panel per horizon of ``curves`` (as ``curves()`` returns): mean +- standard error,
    tuned candidates dashed, names containing a string of ``hide`` left out; saved as PNG."""
    plt = pyplot()

    keys = list(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, c in curves[key].items():
            if any(h in name for h in hide):
                continue
            steps, mean, se = (np.asarray(c[k], float) for k in ("step", "mean", "se"))
            ax.plot(steps, mean, "--" if "tuned" in name else "-", label=name)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("inner step")
        ax.set_ylabel("training loss (minibatch, smoothed)")
        ax.set_title(f"{title}, {key}" if title else key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def display_name(row: dict) -> str:
    """The row's optimizer with its chosen hyperparameters, e.g. ``adam (lr 0.01)``."""
    hp = row.get("hparams") or {}
    return row["optimizer"] + (f" ({', '.join(f'{k} {v:g}' for k, v in hp.items())})"
                               if hp else "")


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of ``evaluate`` rows (a diverged candidate shows ``nan``)."""
    cols = [("final_train_loss", "train loss (full split)"), ("final_test_loss", "test loss"),
            ("test_accuracy", "test acc")]
    lines = [" | ".join([f"{'optimizer':<34}", *(f"{t:>24}" for _, t in cols)])]
    for row in rows:
        cells = [f"{display_name(row):<34}"]
        cells += [f"{row.get(k, math.nan):>15.4f} +- {row.get(k + '_se', math.nan):.4f}"
                  for k, _ in cols]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as CSV (lists and dicts as JSON text)."""
    path = Path(path)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list | dict) else v
                          for k, v in row.items()} for row in rows)
    return path


def write_report(report: Report, out_dir: str | Path, title: str = "", info: dict | None = None,
                 wandb_mode: str = "disabled") -> Path:
    """``summary.json``, ``summary.csv``, ``curves.json`` and ``curves.png`` in ``out_dir``;
    returns the plot's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({"info": info or {}, "rows": report.rows},
                                                     indent=2))
    write_csv(report.rows, out_dir / "summary.csv")
    c = curves(report)
    (out_dir / "curves.json").write_text(json.dumps(c))
    plot = plot_curves(c, out_dir / "curves.png", title)
    if wandb_mode != "disabled":
        _log_wandb(report, plot, out_dir, wandb_mode, info or {})
    return plot


def _log_wandb(report, plot, out_dir, mode, info):
    import wandb

    from meta_train.tracking import usable_wandb_mode

    run = wandb.init(project="learned-opt", dir=str(out_dir), mode=usable_wandb_mode(mode),
                     job_type="eval", config=info, name=f"eval-{Path(out_dir).name}")
    for steps in dict.fromkeys(s for s, _ in report.runs):
        means = {name: np.nanmean(np.where(np.isfinite(r.losses), r.losses, np.nan), axis=0)
                 for (s, name), r in report.runs.items() if s == steps}
        for i in range(steps):
            run.log({f"T={steps}/train_loss/{n}": float(m[i]) for n, m in means.items()})
    cols = [k for k in report.rows[0] if k not in ("grid_scores", "per_seed_final_train_loss")]
    table = wandb.Table(columns=cols, data=[[json.dumps(r.get(c)) if isinstance(r.get(c), dict)
                                             else r.get(c) for c in cols] for r in report.rows])
    run.log({"summary": table, "curves": wandb.Image(str(plot))})
    run.finish()


# ---------------------------------------------------------------- built-in baselines

# The hand-designed baselines with the grids they are tuned over (``learned_opt.hand_designed``
# holds the optax factories and the one learning-rate grid). A learned optimizer tuned "on the
# same grid as AdamW" uses ``{"lr": hand_designed.ADAM_LR_GRID}``.
BASELINES: dict[str, Candidate] = {
    "adamw_cosine": Candidate(hand_designed.adamw_cosine,
                              {"lr": hand_designed.ADAM_LR_GRID, "wd": hand_designed.WD_GRID}),
    "adam": Candidate(hand_designed.adam, {"lr": hand_designed.ADAM_LR_GRID}),
    "adam_default": Candidate(hand_designed.adam_default),
    "sgdm": Candidate(hand_designed.sgdm, {"lr": hand_designed.SGDM_LR_GRID}),
}

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

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import hand_designed
from meta_train.inner import over_members, step_keys, train_steps
from meta_train.report import (  # noqa: F401  (re-exported: the engine's reporting half)
    RESULT_FIELDS,
    TAIL,
    curve,
    curves,
    format_table,
    paired_difference,
    paired_text,
    plot_curves,
    summarize_runs,
    tail_loss,
    verdict,
    write_csv,
    write_report,
)

EVAL_SEEDS = (100, 101, 102, 103, 104)  # never used by meta-training (it folds keys from seed)
TUNE_SEEDS = (200, 201, 202)


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

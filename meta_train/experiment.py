"""The paper's learned-optimizer experiment (PAPER_NOTES section 5) as one resumable pipeline.

For each task and method: meta-train with the paper's PES protocol (16 members, K=50, std 0.01,
Adam with clipping 1.0, T=2,000 or 5,000), the same budget and seed for every method; then
evaluate on unseen seeds at the meta-training horizon T and at 5T against Adam and
SGD-momentum whose learning rates were tuned on other seeds, at each horizon.

Layout under ``out`` (default ``results/experiment1``)::

    <task>/<method>/optimizer/      learned_opt.load_optax checkpoint
    <task>/<method>/summary.json    budget, meta-training facts, evaluation at T and 5T
    <task>/<method>/metrics.jsonl.gz  the meta-training log (one row per outer step, gzipped)
    <task>/baselines.json           tuned baselines per horizon (learning-rate grid scores too)
    <task>/curves.json              mean and standard error curves of every optimizer
    <task>/curves.png               those curves, one panel per horizon
    summary.csv                     one row per task, method and horizon

Meta-training run directories (checkpoints, for ``--resume``) live under ``runs`` (not
committed). Every stage is skipped when its output exists and matches, so rerunning the same
command continues where it stopped; a larger budget continues the same meta-training runs.

Example (seconds; the tiny task)::

    protocol = PROTOCOLS["mlp_fmnist"]._replace(task="mlp_fmnist_tiny", horizon=100,
                                                min_horizon=50, truncation=10)
    run_method(protocol, "sgdm", budget=5, out="/tmp/e1", runs="/tmp/e1_runs")
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from learned_opt.features import PROGRESS_CENTRES

PAPER_OUTER_STEPS = 50_000
# Reported field -> the ``evaluation.Runs`` field it summarises.
RESULT_FIELDS = {"final_train_loss": "final_train", "final_test_loss": "final_test",
                 "test_accuracy": "test_accuracy"}


# Every method gets the same rule options (README, ablation): the network term scaled by rms(m)
# and kept tangent to the weights, a step embedding that saturates within the shortest episode,
# and training progress (the schedule and f's progress channels; sgdm gets the schedule alone).
RULE = (("network_scale", "momentum_rms"), ("network_tangent", True),
        ("step_timescales", (1, 3, 10, 30, 100, 300)), ("progress_centres", PROGRESS_CENTRES),
        # Unclipped features: clipping to [-1, 1] before the per-tensor RMS makes the weight
        # channel scale-dependent; without it the rule holds up at 5T (README ablation,
        # mlp_fmnist unf: 0.4379 -> 0.3721 at T=10000 with 3,000 outer steps).
        ("clip_features", False))


class TaskProtocol(NamedTuple):
    """How one task is meta-trained and evaluated (paper values unless noted)."""

    task: str
    horizon: int  # T of meta-training (paper: 2,000; Transformer 5,000)
    methods: tuple[str, ...]  # the methods the paper compares on this task
    eval_seeds: int  # unseen seeds reported (paper: 5; Transformer 3)
    outer_lr: float = 1e-3  # open in the paper; 3e-3 diverged at T=2,000 on mlp_fmnist
    min_horizon: int = 100  # episodes log-uniform in [min_horizon, T] (ablation: README)
    truncation: int = 50
    population: int = 16
    std: float = 0.01
    horizon_factors: tuple[int, ...] = (1, 5)  # evaluate at T and 5T
    objective: str = "mean"  # meta-objective (meta_train.estimators.OBJECTIVES)
    optimizer_args: tuple[tuple[str, object], ...] = RULE
    # Keep the optimizer every N outer steps and report the one that does best on the tuning
    # seeds at T (the baselines' learning rates are chosen the same way); 0: the last one.
    snapshot_every: int = 1000


PROTOCOLS = {
    "mlp_fmnist": TaskProtocol("mlp_fmnist", 2000, ("sgdm", "deepset", "nfn", "unf"), 5),
    "cnn_cifar10": TaskProtocol("cnn_cifar10", 2000, ("sgdm", "deepset", "nfn", "unf"), 5),
    # Starts at alpha 0.03 (the task's optimizer_defaults: at 0.1 members diverge).
    "rnn_lm": TaskProtocol("rnn_lm", 2000, ("sgdm", "deepset", "unf"), 5),
    "transformer_lm": TaskProtocol("transformer_lm", 5000, ("sgdm", "deepset", "unf"), 3),
}
BASELINES = ("adam", "sgdm")


def with_overrides(protocol: TaskProtocol, objective: str | None = None,
                   min_horizon: int | None = None, optimizer_args=(),
                   horizon_factors=None) -> TaskProtocol:
    """``protocol`` with the options a user overrides (``None`` / empty: keep the protocol's).

    ``optimizer_args``: ``(key, value)`` pairs that override options of the rule for every
    method (later pairs win).
    """
    if objective:
        protocol = protocol._replace(objective=objective)
    if min_horizon is not None:
        protocol = protocol._replace(min_horizon=min_horizon)
    if optimizer_args:
        protocol = protocol._replace(
            optimizer_args=protocol.optimizer_args + tuple(map(tuple, optimizer_args)))
    if horizon_factors:
        protocol = protocol._replace(horizon_factors=tuple(horizon_factors))
    return protocol


def meta_config(protocol: TaskProtocol, method: str, budget: int, run_dir, seed: int = 0,
                wandb: str = "disabled"):
    """The ``MetaTrainConfig`` of one (task, method) run: identical for every method."""
    from meta_train.config import MetaTrainConfig

    return MetaTrainConfig(
        task=protocol.task, optimizer=method,
        optimizer_args=dict(protocol.optimizer_args),
        estimator="pes", population=protocol.population,
        truncation=protocol.truncation, horizon=protocol.horizon,
        min_horizon=protocol.min_horizon, outer_steps=budget, outer_lr=protocol.outer_lr,
        clip=1.0, std=protocol.std, objective=protocol.objective, seed=seed, out=str(run_dir),
        resume=True, checkpoint_every=min(250, budget), wandb=wandb,
        snapshot_every=protocol.snapshot_every)


def budget_facts(protocol: TaskProtocol, outer_steps: int) -> dict:
    """Outer steps, member inner steps and the fraction of the paper's budget."""
    member_steps = outer_steps * protocol.population * protocol.truncation
    return dict(outer_steps=outer_steps, member_steps=member_steps,
                paper_fraction=outer_steps / PAPER_OUTER_STEPS)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_method(protocol: TaskProtocol, method: str, budget: int, out, runs, seed: int = 0,
               wandb: str = "disabled", log=print) -> Path:
    """Meta-train ``method`` on the task up to ``budget`` outer steps (resumable).

    Returns ``out/<task>/<method>``, holding ``optimizer/`` and ``metrics.jsonl.gz``.
    """
    from meta_train.config import MetaTrainConfig
    from meta_train.tracking import read_metrics
    from meta_train.train import meta_train

    dest = Path(out) / protocol.task / method
    run_dir = Path(runs) / protocol.task / method
    facts = budget_facts(protocol, budget)
    done = _steps_done(run_dir)
    # meta_train.json is written last: without it the copy was interrupted and is redone.
    finished = _read_json(dest / "meta_train.json").get("outer_steps", 0)
    # Without its run directory (a fresh clone) a committed result of at least this budget is
    # reused; a larger budget then starts a new run.
    reached = done if run_dir.exists() else finished
    if finished and reached >= budget:
        log(f"[{protocol.task}/{method}] meta-training done ({reached} outer steps)")
        return dest
    log(f"[{protocol.task}/{method}] meta-training to {budget} outer steps "
        f"({facts['member_steps']:,} member-steps, {100 * facts['paper_fraction']:.1f}% of the "
        f"paper's {PAPER_OUTER_STEPS:,}); resuming from {done}" if done else
        f"[{protocol.task}/{method}] meta-training {budget} outer steps "
        f"({facts['member_steps']:,} member-steps, {100 * facts['paper_fraction']:.1f}% of the "
        f"paper's {PAPER_OUTER_STEPS:,})")
    config = meta_config(protocol, method, budget, run_dir, seed, wandb)
    given = set(MetaTrainConfig.RUN_FIELDS) - {"loss_cap"}
    t0 = time.perf_counter()
    meta_train(config, progress=True, given=given)
    rows = read_metrics(run_dir)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "meta_train.json").unlink(missing_ok=True)  # marks the copy incomplete until the end
    if (dest / "optimizer").exists():
        shutil.rmtree(dest / "optimizer")
    chosen, selection = select_snapshot(protocol, run_dir, log)
    shutil.copytree(chosen, dest / "optimizer")
    # gzip: 10,000 rows are 4 MB of JSON, 10x less compressed (results stay small).
    with (run_dir / "metrics.jsonl").open("rb") as src, gzip.GzipFile(
            dest / "metrics.jsonl.gz", "wb", mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    wall = sum(r.get("wall_s") or 0.0 for r in rows)
    (dest / "meta_train.json").write_text(json.dumps(
        facts | dict(wall_s=wall, session_wall_s=time.perf_counter() - t0,
                     config=json.loads((run_dir / "config.json").read_text()),
                     final_meta_loss=_tail_mean(rows, "meta_loss"), selection=selection),
        indent=2))
    return dest


def select_snapshot(protocol: TaskProtocol, run_dir, log=print) -> tuple[Path, dict]:
    """The run's optimizer snapshot (or final optimizer) that trains best on the tuning seeds.

    Candidates: ``run_dir/snapshots/step_*`` and ``run_dir/optimizer`` (the last step). Each is
    scored like the baselines' learning rates: mean training loss over the last 10% of T steps
    on ``evaluation.TUNE_SEEDS`` (never the reported seeds). Returns the chosen directory and
    ``{"selected_step", "scores": {step: score}, "seeds", "steps"}``; with one candidate,
    nothing is evaluated.
    """
    import learned_opt
    import tasks
    from meta_train.evaluation import TUNE_SEEDS, tail_loss, train_runs

    run_dir = Path(run_dir)
    last = _steps_done(run_dir)
    candidates = {int(p.name.split("_")[1]): p for p in sorted(run_dir.glob("snapshots/step_*"))
                  if int(p.name.split("_")[1]) < last}
    candidates[last] = run_dir / "optimizer"
    if len(candidates) == 1:
        return candidates[last], {"selected_step": last, "scores": {}}
    task = tasks.get_task(protocol.task)
    scores = {}
    for step, path in sorted(candidates.items()):
        try:
            lopt, meta = learned_opt.load(path)
        except (OSError, ValueError) as e:  # a snapshot cut short by a kill: skip it
            log(f"[{protocol.task}] snapshot {path} unreadable ({e}); skipped")
            continue
        runs = train_runs(task, lopt.as_optax(meta, num_steps=protocol.horizon), TUNE_SEEDS,
                          protocol.horizon)
        scores[step] = float(tail_loss(runs.losses).mean())
    best = min(scores, key=lambda k: (scores[k], -k))  # ties: the later snapshot
    log(f"[{protocol.task}] snapshot scores on tuning seeds {list(TUNE_SEEDS)} at "
        f"T={protocol.horizon}: " + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items())
        + f"; selected step {best}")
    return candidates[best], {"selected_step": best, "scores": scores,
                              "seeds": list(TUNE_SEEDS), "steps": protocol.horizon}


def _steps_done(run_dir: Path) -> int:
    from meta_train import checkpoint

    meta = checkpoint.latest(run_dir) if run_dir.exists() else None
    return int(meta["step"]) if meta else 0


def _tail_mean(rows: list[dict], key: str, n: int = 100) -> float | None:
    vals = [r[key] for r in rows[-n:] if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _curve(losses: np.ndarray, points: int = 200) -> dict:
    """Mean and standard error over seeds of smoothed minibatch losses, ``points`` samples."""
    from meta_train.evaluation import smooth

    losses = np.where(np.isfinite(losses), losses, np.nan)
    sm = smooth(losses, max(1, losses.shape[1] // 25))
    idx = np.unique(np.linspace(0, sm.shape[1] - 1, points).astype(int))
    mean = np.nanmean(sm[:, idx], axis=0)
    se = np.nanstd(sm[:, idx], axis=0, ddof=1) / math.sqrt(len(sm)) if len(sm) > 1 else 0 * mean
    return dict(step=(idx + 1).tolist(), mean=mean.tolist(), se=np.asarray(se).tolist())


def _row(runs) -> dict:
    from meta_train.evaluation import mean_se

    row = {}
    for field, source in RESULT_FIELDS.items():
        m, se = mean_se(getattr(runs, source))
        row[field], row[field + "_se"] = m, se
    row["per_seed_final_train_loss"] = [float(x) for x in runs.final_train]
    row["diverged_seeds"] = int(np.sum(~np.isfinite(runs.final_train)))
    return row


def _result_cells(entry: dict) -> dict:
    return {k: entry[k] for f in RESULT_FIELDS for k in (f, f + "_se")}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: a kill never leaves half a file


def evaluate_task(protocol: TaskProtocol, methods, out, log=print) -> list[dict]:
    """Evaluate every meta-trained method and the tuned baselines at each horizon (cached).

    Seeds: ``EVAL_SEEDS`` (never used by meta-training); the baselines' learning rates are
    chosen on ``TUNE_SEEDS`` at each horizon. Returns the rows of ``summary.csv``.
    """
    import learned_opt
    import tasks
    from learned_opt import hand_designed
    from meta_train.evaluation import EVAL_SEEDS, TUNE_SEEDS, train_runs, tune_learning_rate
    from meta_train.train import initial_meta_params

    task = tasks.get_task(protocol.task)
    task_dir = Path(out) / protocol.task
    task_dir.mkdir(parents=True, exist_ok=True)  # baselines come first, before any method
    seeds = list(EVAL_SEEDS[:protocol.eval_seeds])
    base_path, curves_path = task_dir / "baselines.json", task_dir / "curves.json"
    baselines, curves = _read_json(base_path), _read_json(curves_path)
    rows = []
    for factor in protocol.horizon_factors:
        steps = protocol.horizon * factor
        key = f"T={steps}"
        curves.setdefault(key, {})
        for base in BASELINES:
            entry = baselines.setdefault(key, {}).get(base)
            if entry is None or entry.get("seeds") != seeds:
                make = hand_designed.BASELINES[base]
                log(f"[{protocol.task}] tuning {base} at T={steps} on seeds {list(TUNE_SEEDS)}")
                best, scores = tune_learning_rate(task, make, hand_designed.LR_GRIDS[base],
                                                  TUNE_SEEDS, steps)
                runs = train_runs(task, make(best), seeds, steps)
                entry = _row(runs) | dict(lr=best, lr_grid_scores=scores, seeds=seeds,
                                          tune_seeds=list(TUNE_SEEDS))
                baselines[key][base] = entry
                curves[key][f"{base} (tuned lr {best:g})"] = _curve(runs.losses)
                _write_json(base_path, baselines)
                _write_json(curves_path, curves)
            rows.append(dict(task=protocol.task, method=f"{base} (tuned)", horizon=steps,
                             horizon_factor=factor, lr=entry["lr"])
                        | _result_cells(entry))
        adam = baselines[key]["adam"]["final_train_loss"]
        for method in methods:
            mdir = task_dir / method
            if not (mdir / "meta_train.json").exists():
                continue  # not meta-trained (or its copy was interrupted: run_method redoes it)
            summary = _read_json(mdir / "summary.json")
            sha = _sha(mdir / "optimizer" / "meta_params.msgpack")
            entry = summary.get("eval", {}).get(key)
            if entry is None or entry.get("optimizer_sha") != sha or entry["seeds"] != seeds:
                log(f"[{protocol.task}/{method}] evaluating at T={steps} on seeds {seeds}")
                lopt, meta = learned_opt.load(mdir / "optimizer")
                runs = train_runs(task, lopt.as_optax(meta, num_steps=steps), seeds, steps)
                run_seed = _read_json(mdir / "meta_train.json")["config"]["seed"]
                init = initial_meta_params(lopt, run_seed)
                runs0 = train_runs(task, lopt.as_optax(init, num_steps=steps), seeds, steps)
                entry = _row(runs) | dict(seeds=seeds, optimizer_sha=sha,
                                          initialisation=_row(runs0))
                summary.setdefault("eval", {})[key] = entry
                curves[key][method] = _curve(runs.losses)
                curves[key][f"{method} (initialisation)"] = _curve(runs0.losses)
                _write_json(curves_path, curves)
            summary |= _read_json(mdir / "meta_train.json")
            _write_json(mdir / "summary.json", summary)
            rows.append(dict(task=protocol.task, method=method, horizon=steps,
                             horizon_factor=factor, outer_steps=summary.get("outer_steps"),
                             selected_step=summary.get("selection", {}).get("selected_step"),
                             paper_fraction=summary.get("paper_fraction"),
                             meta_train_wall_s=summary.get("wall_s"))
                        | _result_cells(entry)
                        | dict(initialisation_train_loss=entry["initialisation"][
                                   "final_train_loss"],
                               vs_tuned_adam=entry["final_train_loss"] - adam))
    plot_task(curves, task_dir / "curves.png", protocol.task)
    return rows


def plot_task(curves: dict, path: Path, title: str) -> Path:
    """One panel per horizon: meta-trained methods and tuned baselines (mean +- s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, c in curves[key].items():
            if "initialisation" in name:
                continue  # kept in curves.json; the figure compares methods, as the paper's
            steps, mean, se = (np.asarray(c[k], float) for k in ("step", "mean", "se"))
            style = "--" if "tuned" in name else "-"
            ax.plot(steps, mean, style, label=name)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("inner step")
        ax.set_ylabel("training loss (minibatch, smoothed)")
        ax.set_title(f"{title}, {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary_csv(rows: list[dict], path) -> Path:
    """All rows of every task (``evaluate_task``) as one CSV."""
    path = Path(path)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path

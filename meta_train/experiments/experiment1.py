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

import gzip
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from learned_opt import presets

PAPER_OUTER_STEPS = 50_000


# Every method gets the same rule options: the library's recommended preset (learned_opt.presets).
RULE = tuple(presets.get("recommended").items())


class TaskProtocol(NamedTuple):
    """How one task is meta-trained and evaluated (paper values unless noted)."""

    task: str
    horizon: int  # T of meta-training (paper: 2,000; Transformer 5,000)
    methods: tuple[str, ...]  # the methods the paper compares on this task
    eval_seeds: int  # unseen seeds reported (paper: 5; Transformer 3)
    outer_lr: float = 1e-3  # open in the paper; 3e-3 diverged at T=2,000 on mlp_fmnist
    outer_schedule: str = "constant"  # or "cosine" (to 10% over the budget): choose on a pilot
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
                   horizon_factors=None, outer_lr: float | None = None,
                   outer_schedule: str | None = None) -> TaskProtocol:
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
    if outer_lr is not None:
        protocol = protocol._replace(outer_lr=float(outer_lr))
    if outer_schedule is not None:
        protocol = protocol._replace(outer_schedule=outer_schedule)
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
        outer_schedule=protocol.outer_schedule,
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
    given = MetaTrainConfig.field_names() - {"loss_cap"}
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


def _result_cells(entry: dict) -> dict:
    from meta_train.evaluation import RESULT_FIELDS

    return {k: entry[k] for f in RESULT_FIELDS for k in (f, f + "_se")}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    from learned_opt.checkpoint import write_atomic

    write_atomic(path, json.dumps(data, indent=2).encode())  # a kill never leaves half a file


def evaluate_task(protocol: TaskProtocol, methods, out, log=print) -> list[dict]:
    """Evaluate every meta-trained method and the tuned baselines at each horizon (cached).

    Seeds: ``EVAL_SEEDS`` (never used by meta-training); the baselines' learning rates are
    chosen on ``TUNE_SEEDS`` at each horizon (``meta_train.evaluation``). Returns the rows of
    ``summary.csv``.
    """
    import tasks
    from meta_train.evaluation import EVAL_SEEDS, plot_curves

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
                log(f"[{protocol.task}] tuning {base} at T={steps}")
                entry = _evaluate_baseline(task, base, steps, seeds, curves[key], log)
                baselines[key][base] = entry
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
                entry = _evaluate_method(task, mdir, method, steps, seeds, curves[key])
                summary.setdefault("eval", {})[key] = entry | dict(optimizer_sha=sha)
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
    plot_curves(curves, task_dir / "curves.png", protocol.task, hide=("initialisation",))
    return rows


def _evaluate_baseline(task, base: str, steps: int, seeds: list, curves: dict, log) -> dict:
    """``baselines.json``'s entry of one tuned baseline at ``steps``; adds its curve."""
    from meta_train import evaluation

    report = evaluation.evaluate(task, {base: evaluation.BASELINES[base]}, [steps], seeds,
                                 evaluation.TUNE_SEEDS, log=lambda m: log(f"[{task.name}] {m}"))
    lr = report.rows[0]["hparams"]["lr"]
    runs = report.runs[steps, base]
    curves[f"{base} (tuned lr {lr:g})"] = evaluation.curve(runs.losses)
    scores = {s["lr"]: s["score"] for s in report.rows[0]["grid_scores"]}
    return _entry(runs) | dict(lr=lr, lr_grid_scores=scores, seeds=seeds,
                               tune_seeds=list(evaluation.TUNE_SEEDS))


def _evaluate_method(task, mdir: Path, method: str, steps: int, seeds: list,
                     curves: dict) -> dict:
    """A method's ``summary.json`` evaluation entry at ``steps`` (its initialisation
    included); adds both curves."""
    import learned_opt
    from meta_train import evaluation
    from meta_train.train import initial_meta_params

    lopt, meta = learned_opt.load(mdir / "optimizer")
    from meta_train.config import MetaTrainConfig

    stored = json.dumps(_read_json(mdir / "meta_train.json")["config"])  # flat or by section
    init = initial_meta_params(lopt, MetaTrainConfig.from_json(stored).seed)
    metas = {method: meta, f"{method} (initialisation)": init}
    report = evaluation.evaluate(
        task, {name: evaluation.Candidate(lambda steps, m=m: lopt.as_optax(m, num_steps=steps))
               for name, m in metas.items()}, [steps], seeds, log=lambda m: None)
    for name in metas:
        curves[name] = evaluation.curve(report.runs[steps, name].losses)
    return _entry(report.runs[steps, method]) | dict(
        seeds=seeds, initialisation=_entry(report.runs[steps, f"{method} (initialisation)"]))


def _entry(runs) -> dict:
    """Summarised runs in the layout of the committed results (no last-step loss)."""
    from meta_train.evaluation import summarize_runs

    return {k: v for k, v in summarize_runs(runs).items() if not k.startswith("train_loss_at")}


def write_summary_csv(rows: list[dict], path) -> Path:
    """All rows of every task (``evaluate_task``) as one CSV."""
    from meta_train.evaluation import write_csv

    return write_csv(rows, path)


def merge_summary_csv(rows: list[dict], path) -> list[dict]:
    """Write ``rows`` (``evaluate_task``) into the summary CSV at ``path``, keeping the rows
    it holds of the tasks and horizons not in ``rows``; returns all its rows, in the order of
    ``PROTOCOLS`` and then of the horizon (the rows kept from the file as read: text)."""
    import csv

    path = Path(path)
    done = {(r["task"], str(r["horizon"])) for r in rows}
    if path.exists():  # keep the rows of tasks and horizons not evaluated now
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if (r["task"], r["horizon"]) not in done] + rows
    order = list(PROTOCOLS)
    rows.sort(key=lambda r: (order.index(r["task"]) if r["task"] in order else len(order),
                             int(r["horizon"])))
    write_summary_csv(rows, path)
    return rows

"""Reporting for the evaluation engine (``meta_train.evaluation``): statistics over seeds,
paired differences, learning curves, plots, tables, CSV and the report directory.

Example:
  >>> import numpy as np
  >>> d = paired_difference(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.4, 3.6]))
  >>> round(d["mean"], 3), d["verdict"]
  (-0.5, 'better than')
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from learned_opt.extras import pyplot

if TYPE_CHECKING:
    from meta_train.evaluation import Report, Runs

TAIL = 0.1  # tuning score: mean minibatch training loss over the last 10% of the steps


def tail_loss(losses: np.ndarray, frac: float = TAIL) -> np.ndarray:
    """Mean minibatch loss over the last ``frac`` of the steps (per seed); NaN counts as inf."""
    n = max(1, int(round(losses.shape[-1] * frac)))
    tail = np.where(np.isfinite(losses[..., -n:]), losses[..., -n:], np.inf)
    return tail.mean(axis=-1)


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

"""Architectures no optimizer was meta-trained on, and the evaluation of a shipped optimizer.

The weight-space-agnostic optimizers (``learned_opt.list_pretrained()``) are meta-trained on the
paper's four tasks at their default sizes. ``HELDOUT`` lists other architectures on the same
offline data: deeper and wider, other layer types, other wiring. ``evaluate`` trains each with
the optimizer (``learned_opt.load_optax``, spec given by the task), with the optimizer's own
initialisation, and with Adam and SGD-momentum tuned on other seeds, at several horizons.

Example (minutes on a CPU)::

    rows = evaluate("unf_universal_4tasks", ["mlp_deep_wide"], horizons=(2000,), out="results/x")
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

import tasks
from learned_opt.infer import infer_perm_spec
from tasks.base import ClassificationTask, LanguageModelTask
from tasks.models import CellLM


class ResidualMLP(nn.Module):
    """``x = W_in p; x += W_out_i relu(W_in_i relu(x))`` per block; logits from relu(x)."""

    width: int = 64
    hidden: int = 128
    blocks: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, name="inp")(x.reshape(x.shape[0], -1))
        for i in range(self.blocks):
            h = nn.relu(nn.Dense(self.hidden, name=f"block_{i}_in")(nn.relu(x)))
            x = x + nn.Dense(self.width, name=f"block_{i}_out")(h)
        return nn.Dense(self.num_classes, name="out")(nn.relu(x))


def residual_mlp_spec(blocks: int) -> dict:
    """The residual stream shares one label everywhere it is read or written."""
    spec = {"inp": {"kernel": (None, "residual"), "bias": ("residual",)},
            "out": {"kernel": ("residual", None), "bias": (None,)}}
    for i in range(blocks):
        spec[f"block_{i}_in"] = {"kernel": ("residual", f"h{i}"), "bias": (f"h{i}",)}
        spec[f"block_{i}_out"] = {"kernel": (f"h{i}", "residual"), "bias": ("residual",)}
    return spec


@dataclasses.dataclass(frozen=True)
class ResidualMLPConfig:
    width: int = 64
    hidden: int = 128
    blocks: int = 2
    batch_size: int = 128
    data_source: str = ""


def _gru_lm():
    text = tasks.get_task("rnn_lm")  # its data (the same byte streams)
    cfg = text.config  # the RNN task's sizes and data (RNNLMConfig): only the cell differs
    model = CellLM(cfg.vocab_size, cfg.embed_dim, cfg.hidden, cell="gru")
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, cfg.seq_len), jnp.int32))
    return LanguageModelTask("gru_lm", cfg, model, text.data, infer_perm_spec(params["params"]))


def _residual_mlp():
    images = tasks.get_task("mlp_fmnist")
    cfg = ResidualMLPConfig(data_source=images.config.data_source)
    model = ResidualMLP(cfg.width, cfg.hidden, cfg.blocks)
    return ClassificationTask("residual_mlp", cfg, model, images.data,
                              residual_mlp_spec(cfg.blocks), input_scale=images.input_scale)


def _mlp_fmnist28(*hidden_sizes: int):
    return tasks.get_task("mlp_fmnist", hidden_sizes=hidden_sizes, resolution=28)


# name -> (what differs from the meta-training tasks, builder)
HELDOUT: dict[str, tuple[str, Callable]] = {
    "mlp_deep_wide": ("Fashion-MNIST MLP with 3 hidden layers of 128 (trained on: 1 of 32)",
                      lambda: tasks.get_task("mlp_fmnist", hidden_sizes=(128, 128, 128))),
    "cnn_3conv": ("CIFAR-10 CNN with 3 conv layers 16-32-64, strides 2-2-1 (trained on: 2 "
                  "layers 16-32)",
                  lambda: tasks.get_task("cnn_cifar10", channels=(16, 32, 64),
                                         strides=(2, 2, 1))),
    "gru_lm": ("byte LM with a GRU (6 gate matrices) of 64 units (trained on: a ReLU RNN)",
               _gru_lm),
    "residual_mlp": ("Fashion-MNIST residual MLP, 2 blocks, width 64 / 128 (trained on: no "
                     "residual connections)", _residual_mlp),
    "mlp_fmnist28_1024": ("Fashion-MNIST at 28x28 (784 inputs), one hidden layer of 1024 "
                          "(trained on: 8x8 inputs, widths <= 128)",
                          lambda: _mlp_fmnist28(1024)),
    "mlp_fmnist28_10m": ("Fashion-MNIST at 28x28, 3 hidden layers of 2048: 10.0M parameters "
                         "(trained on: <= 0.02M)", lambda: _mlp_fmnist28(2048, 2048, 2048)),
}


def list_heldout() -> list[str]:
    return list(HELDOUT)


def get_heldout(name: str):
    if name not in HELDOUT:
        raise ValueError(f"unknown held-out architecture {name!r}; choose from {list_heldout()}")
    return HELDOUT[name][1]()


def candidates(optimizer: str, baselines: Sequence[str] = ("adam", "sgdm")) -> dict:
    """The optimizer (``learned``), its initialisation, and ``baselines`` (names in
    ``meta_train.evaluation.BASELINES``, tuned on their grids), as evaluation candidates."""
    import learned_opt
    from learned_opt.checkpoint import optax_for
    from meta_train.evaluation import BASELINES, Candidate
    from meta_train.train import initial_meta_params

    lopt, meta = learned_opt.load(optimizer)
    init_meta = initial_meta_params(lopt, 0)  # where its meta-training started (seed 0)

    def agnostic(m):
        return Candidate(lambda task, steps: optax_for(lopt, m, steps, task.perm_spec))

    return ({"learned": agnostic(meta), "initialisation": agnostic(init_meta)}
            | {f"{b} (tuned)": BASELINES[b] for b in baselines})


def evaluate(optimizer: str, names: Sequence[str], horizons: Sequence[int], out,
             seeds: Sequence[int] | None = None, tune_seeds: Sequence[int] | None = None,
             baselines: Sequence[str] = ("adam", "sgdm"), log=print) -> list[dict]:
    """Each held-out architecture at each horizon: ``candidates(optimizer, baselines)`` by
    ``meta_train.evaluation.evaluate`` (baselines tuned on ``tune_seeds``), on ``seeds``.

    Writes ``out/<name>/T=<steps>.json`` as each finishes (a rerun skips them) and returns the
    rows (``evaluation.evaluate``'s, plus ``architecture``, ``method`` and ``lr``).
    """
    from meta_train import evaluation

    seeds = list(evaluation.EVAL_SEEDS[:3] if seeds is None else seeds)
    tune_seeds = list(evaluation.TUNE_SEEDS[:2] if tune_seeds is None else tune_seeds)
    cands = candidates(optimizer, baselines)
    rows = []
    for name in names:
        task = get_heldout(name)
        for steps in horizons:
            path = Path(out) / name / f"T={steps}.json"
            if path.exists():
                rows.extend(json.loads(path.read_text())["rows"])
                continue
            log(f"[{name}] T={steps}")
            report = evaluation.evaluate(task, cands, [steps], seeds, tune_seeds,
                                         log=lambda m, name=name: log(f"[{name}] {m}"))
            here = [dict(architecture=name, method=r["optimizer"],
                         lr=(r["hparams"] or {}).get("lr")) | r for r in report.rows]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(optimizer=optimizer, seeds=seeds,
                                            tune_seeds=tune_seeds, rows=here), indent=2))
            rows.extend(here)
    return rows


def get_architecture(name: str):
    """A held-out architecture (``HELDOUT``) or a registered task (``tasks.list_tasks()``)."""
    if name in HELDOUT:
        return get_heldout(name)
    if name in tasks.list_tasks():
        return tasks.get_task(name)
    raise KeyError(f"unknown architecture {name!r}; held-out: {list_heldout()}, or a task of "
                   "tasks.list_tasks()")


def direction_candidates(checkpoints: dict[str, str], lr_tuned: Sequence[str] = (),
                         untrained: str | None = "normalised Adam (untrained rule)") -> dict:
    """Learned-direction optimizers (``label -> checkpoint or shipped name``) as evaluation
    candidates at their default schedule; those in ``lr_tuned`` also with the schedule's peak
    tuned on AdamW's learning-rate grid; plus the untrained rule (Adam's direction normalised
    per tensor, the same for every variant) under ``untrained`` when given."""
    import learned_opt
    from learned_opt import direction, hand_designed
    from learned_opt.checkpoint import optax_for
    from meta_train.evaluation import Candidate

    def default(lopt, meta):
        return Candidate(lambda task, steps: optax_for(lopt, meta, steps, task.perm_spec))

    def tuned(lopt, meta):
        def make(lr, task, steps):  # lr traced: the whole grid in one jit
            shape = direction.default_schedule(1.0, steps, lopt.config.warmup_fraction)
            return lopt.as_optax(meta, steps, task.perm_spec, learning_rate=lambda t: lr * shape(t))
        return Candidate(make, {"lr": hand_designed.ADAM_LR_GRID})

    out = {}
    for label, path in checkpoints.items():
        lopt, meta = learned_opt.load(path)
        out[label] = default(lopt, meta)
        if label in lr_tuned:
            out[f"{label} (lr tuned)"] = tuned(lopt, meta)
        if untrained and untrained not in out:
            out[untrained] = default(lopt, lopt.init(jax.random.key(0)))
    unknown = sorted(set(lr_tuned) - set(checkpoints))
    if unknown:
        raise ValueError(f"lr_tuned names {unknown}, which are not among {sorted(checkpoints)}")
    return out


def evaluate_candidates(candidates: dict, names: Sequence[str], horizons: Sequence[int], out,
                        seeds: Sequence[int], tune_seeds: Sequence[int], log=print
                        ) -> list[dict]:
    """Each candidate on each architecture (``get_architecture``) at each horizon by
    ``meta_train.evaluation.evaluate``: one JSON per (architecture, horizon, candidate) in
    ``out/<architecture>/T=<steps>/<candidate>.json``, written as each finishes (a rerun, or
    another process, skips finished ones). Returns every finished row for ``names``."""
    from meta_train import evaluation

    rows = []
    for name in names:
        task = get_architecture(name)
        for steps in horizons:
            for label, cand in candidates.items():
                path = Path(out) / name / f"T={steps}" / f"{label.replace('/', '_')}.json"
                if not path.exists():
                    log(f"[{name}] T={steps} {label}")
                    report = evaluation.evaluate(task, {label: cand}, [steps], seeds, tune_seeds,
                                                 log=lambda m, n=name: log(f"[{n}] {m}"))
                    row = dict(architecture=name) | report.rows[0]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(dict(seeds=list(seeds),
                                                    tune_seeds=list(tune_seeds), row=row),
                                               indent=2))
                rows.append(json.loads(path.read_text())["row"])
    return rows


def scorecard(rows: Sequence[dict], label: str, adamw: str = "adamw_cosine (tuned)",
              adam: str = "adam (tuned)") -> str:
    """Issue 20's two counts for candidate ``label`` over every (architecture, horizon) cell of
    ``rows`` that has it and both references: cells where it beats tuned constant Adam (paired
    mean difference < 0) and cells where it is within one standard error of tuned AdamW + cosine
    or better (paired mean <= SE). A markdown table, then the counts.

    >>> row = lambda name, losses: dict(architecture="a", horizon=10, optimizer=name,
    ...                                 per_seed_final_train_loss=losses)
    >>> text = scorecard([row("x", [1.0, 1.1]), row("adamw_cosine (tuned)", [1.0, 1.0]),
    ...                   row("adam (tuned)", [1.2, 1.2])], "x")
    >>> text.splitlines()[-1]
    'x: beats tuned Adam on 1/1 cells; within 1 SE of tuned AdamW + cosine or better on 1/1'
    """
    from meta_train.evaluation import paired_difference

    cells = {(r["architecture"], r["horizon"], r["optimizer"]): r["per_seed_final_train_loss"]
             for r in rows if "per_seed_final_train_loss" in r}
    lines = ["| architecture | T | vs tuned AdamW + cosine | vs tuned Adam |", "|---|---|---|---|"]
    wins = close = total = 0
    for arch, steps in dict.fromkeys((r["architecture"], r["horizon"]) for r in rows):
        mine, ref_w, ref_a = (cells.get((arch, steps, n)) for n in (label, adamw, adam))
        if mine is None or ref_w is None or ref_a is None:
            continue
        dw, da = paired_difference(mine, ref_w), paired_difference(mine, ref_a)
        total, wins, close = total + 1, wins + (da["mean"] < 0), close + (dw["mean"] <= dw["se"])
        lines.append(f"| {arch} | {steps} | {dw['mean']:+.4f} +- {dw['se']:.4f} | "
                     f"{da['mean']:+.4f} +- {da['se']:.4f} |")
    lines.append(f"\n{label}: beats tuned Adam on {wins}/{total} cells; within 1 SE of tuned "
                 f"AdamW + cosine or better on {close}/{total}")
    return "\n".join(lines)

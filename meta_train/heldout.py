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

# Learning-rate grids of the tuned baselines here: the part of hand_designed.LR_GRIDS that
# held every best value on the paper's tasks (results/experiment1), to fit a CPU session.
GRIDS = {"adam": (1e-3, 3e-3, 1e-2, 3e-2), "sgdm": (0.01, 0.03, 0.1, 0.3)}


class GRULM(nn.Module):
    """Byte-level language model: embedding, one GRU layer, output layer."""

    vocab_size: int = 256
    embed_dim: int = 32
    hidden: int = 64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        x = nn.RNN(nn.GRUCell(self.hidden))(x)
        return nn.Dense(self.vocab_size)(x)


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
    model = GRULM(cfg.vocab_size, cfg.embed_dim, cfg.hidden)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, cfg.seq_len), jnp.int32))
    return LanguageModelTask("gru_lm", cfg, model, text.data, infer_perm_spec(params["params"]))


def _residual_mlp():
    images = tasks.get_task("mlp_fmnist")
    cfg = ResidualMLPConfig(data_source=images.config.data_source)
    model = ResidualMLP(cfg.width, cfg.hidden, cfg.blocks)
    return ClassificationTask("residual_mlp", cfg, model, images.data,
                              residual_mlp_spec(cfg.blocks), input_scale=images.input_scale)


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
}


def list_heldout() -> list[str]:
    return list(HELDOUT)


def get_heldout(name: str):
    if name not in HELDOUT:
        raise ValueError(f"unknown held-out architecture {name!r}; choose from {list_heldout()}")
    return HELDOUT[name][1]()


def evaluate(optimizer: str, names: Sequence[str], horizons: Sequence[int], out,
             seeds: Sequence[int] | None = None, tune_seeds: Sequence[int] | None = None,
             log=print) -> list[dict]:
    """Each held-out architecture at each horizon: the optimizer, its initialisation, and
    Adam / SGDM tuned on ``tune_seeds`` (lowest tail training loss), on ``seeds``.

    Writes ``out/<name>/T=<steps>.json`` as each finishes (a rerun skips them) and returns the
    rows (final training loss on the full training split, mean and standard error).
    """
    import learned_opt
    from learned_opt import hand_designed
    from meta_train.evaluation import (
        EVAL_SEEDS,
        TUNE_SEEDS,
        mean_se,
        train_runs,
        tune_learning_rate,
    )

    seeds = list(EVAL_SEEDS[:3] if seeds is None else seeds)
    tune_seeds = list(TUNE_SEEDS[:2] if tune_seeds is None else tune_seeds)
    from meta_train.train import initial_meta_params

    lopt, meta = learned_opt.load(optimizer)
    init_meta = initial_meta_params(lopt, 0)  # where its meta-training started (seed 0)
    config = dataclasses.asdict(lopt.config)
    rows = []
    for name in names:
        task = get_heldout(name)
        for steps in horizons:
            path = Path(out) / name / f"T={steps}.json"
            if path.exists():
                rows.extend(json.loads(path.read_text())["rows"])
                continue
            log(f"[{name}] T={steps}")
            results = {}
            for label, m in (("learned", meta), ("initialisation", init_meta)):
                tx = learned_opt.agnostic_optax(lopt.name, m, task.perm_spec, steps, **config)
                results[label] = (train_runs(task, tx, seeds, steps), None)
            for base, grid in GRIDS.items():
                make = hand_designed.BASELINES[base]
                best, scores = tune_learning_rate(task, make, grid, tune_seeds, steps)
                log(f"[{name}] T={steps} {base}: lr {best:g} ({scores})")
                results[f"{base} (tuned)"] = (train_runs(task, make(best), seeds, steps), best)
            here = []
            for label, (runs, lr) in results.items():
                m, se = mean_se(runs.final_train)
                here.append(dict(architecture=name, horizon=steps, method=label, lr=lr,
                                 final_train_loss=m, final_train_loss_se=se,
                                 per_seed=[float(x) for x in runs.final_train]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(optimizer=optimizer, seeds=seeds,
                                            tune_seeds=tune_seeds, grids=GRIDS,
                                            rows=here), indent=2))
            rows.extend(here)
    return rows

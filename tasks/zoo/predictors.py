"""Predictors of a zoo model's test success rate from its weights (the paper's section 5.2).

:class:`PredictConfig` picks the method (``METHODS``: STATNN statistics + MLP, a UNF or a Deep
Set stack with invariant pooling); :func:`train_predictor` trains one on the training split and
keeps the epoch with the best validation Kendall tau; :func:`evaluate_predictions` gives tau and
R^2. The zoo itself: :mod:`tasks.zoo.rnn_zoo`.

Example:
  >>> evaluate_predictions([0.1, 0.5, 0.9], [0.2, 0.4, 0.8])["kendall_tau"]
  1.0
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from learned_opt import DeepSetLinear, InvariantUNF, UNFLinear, statnn_features
from learned_opt.extras import import_optional, pyplot

PyTree = Any


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

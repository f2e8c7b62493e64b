"""Hand-designed baselines for evaluating learned optimizers: SGD with momentum and Adam.

Both are plain optax optimizers. ``LR_GRIDS`` holds the learning rates an evaluation should
search (half-decade log grids wide enough to bracket the best value on the paper's tasks); pick
the best on seeds other than the ones reported.

Example:
  >>> import learned_opt.hand_designed as hd
  >>> txs = {lr: hd.get("adam", lr) for lr in hd.LR_GRIDS["adam"]}
  >>> len(txs) == len(hd.LR_GRIDS["adam"])
  True
"""

from __future__ import annotations

import optax

LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgdm": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}


def sgdm(learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """SGD with (heavy-ball, sum-form) momentum: the ``sgdm`` learned optimizer at its init."""
    return optax.sgd(learning_rate, momentum=momentum)


def adam(learning_rate: float) -> optax.GradientTransformation:
    """Adam with optax's defaults (b1 0.9, b2 0.999, eps 1e-8)."""
    return optax.adam(learning_rate)


BASELINES = {"sgdm": sgdm, "adam": adam}


def get(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The baseline ``name`` (``"sgdm"`` or ``"adam"``) at ``learning_rate``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[name](learning_rate)

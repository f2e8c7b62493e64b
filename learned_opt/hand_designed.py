"""Hand-designed baselines for evaluating learned optimizers, with the grids to tune them over.

Plain optax optimizers, as factories of the hyperparameters an evaluation tunes (keyword ``lr``,
``wd``; ``steps`` for a schedule). ``LR_GRID`` is the one learning-rate grid (half-decade log
steps); each baseline searches the part of it that brackets its best value on the paper's tasks
(``ADAM_LR_GRID`` for adaptive methods, learned optimizers with a tuned learning rate included;
``SGDM_LR_GRID``). ``meta_train.evaluation.BASELINES`` pairs each factory with its grid; pick
the values on seeds other than the reported ones.

Example:
  >>> import learned_opt.hand_designed as hd
  >>> tx = hd.adamw_cosine(lr=1e-3, wd=1e-2, steps=1000)   # 50 warm-up steps, then cosine
  >>> hd.ADAM_LR_GRID[0], hd.ADAM_LR_GRID[-1], hd.SGDM_LR_GRID[0], hd.SGDM_LR_GRID[-1]
  (0.0001, 0.1, 0.003, 1.0)
"""

from __future__ import annotations

import optax

LR_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
ADAM_LR_GRID = LR_GRID[:7]  # 1e-4 ... 0.1
SGDM_LR_GRID = LR_GRID[3:]  # 0.003 ... 1.0
WD_GRID: tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1)  # AdamW's decoupled weight decay
WARMUP = 0.05  # fraction of the horizon spent in linear warm-up (adamw_cosine)


def sgdm(lr: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """SGD with (heavy-ball, sum-form) momentum: the ``sgdm`` learned optimizer at its init."""
    return optax.sgd(lr, momentum=momentum)


def adam(lr: float) -> optax.GradientTransformation:
    """Adam with a constant learning rate and optax's defaults (b1 0.9, b2 0.999, eps 1e-8)."""
    return optax.adam(lr)


def adam_default() -> optax.GradientTransformation:
    """Adam at its defaults, untuned (learning rate 1e-3)."""
    return optax.adam(1e-3)


def warmup_cosine(lr: float, steps: int, warmup: float = WARMUP) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup * steps`` steps (at least 1), then cosine to 0.

    ``lr`` may be a traced value (optax's schedule branches on its peak value, so the shape is
    built at peak 1 and scaled).
    """
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, int(warmup * steps)), steps, 0.0)
    return lambda count: lr * shape(count)


def adamw_cosine(lr: float, wd: float, steps: int, warmup: float = WARMUP
                 ) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay ``wd``) with ``warmup_cosine(lr, steps)``."""
    return optax.adamw(warmup_cosine(lr, steps, warmup), weight_decay=wd)

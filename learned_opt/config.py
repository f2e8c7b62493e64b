"""The options of a learned optimizer (saved with every checkpoint).

The defaults are the paper's rule; :mod:`learned_opt.presets` names the others. The choices of
``momentum_form``, ``network_tangent``, ``network_scale`` and ``fixed_axes`` are the keys of the
tables in :mod:`learned_opt.rules`.

Example:
  >>> LearnedOptimizerConfig(network_scale="momentum_rms").num_features
  19
  >>> LearnedOptimizerConfig(network_scale="rms")
  Traceback (most recent call last):
  ...
  ValueError: network_scale must be one of ('none', 'momentum_rms', 'normalised'), got 'rms'
"""

from __future__ import annotations

import dataclasses
import math

from learned_opt import features as feats
from learned_opt import rules

# Option -> the table of its valid values and their functions (learned_opt.rules).
CHOICES = {"momentum_form": rules.MOMENTUM_FORMS, "network_tangent": rules.NETWORK_TANGENTS,
           "network_scale": rules.NETWORK_SCALES, "fixed_axes": rules.FIXED_AXES}


@dataclasses.dataclass(frozen=True)
class LearnedOptimizerConfig:
    """Options of a learned optimizer (saved with every checkpoint).

    Attributes:
      hidden_features: channels of the hidden layers of f (paper: 32).
      num_layers: layers of f, the last one to 1 channel (paper: 4).
      momentum_decays: decays of the momentum features (averaging form).
      step_timescales: timescales of the step embedding ``tanh(t / s - 1)``.
      init_alpha, init_beta, init_decay: initial nominal step size, network-term scale and
        nominal momentum decay (paper: 0.1, 0.001, 0.9).
      momentum_form: nominal momentum ``"sum"`` (m <- decay m + g, the paper's formula, so the
        initial rule is SGDM at learning rate alpha) or ``"average"`` (m <- decay m +
        (1 - decay) g, public code; the same alpha then acts like a 10x smaller learning rate).
      clip_features: clip the 8 state channels to [-1, 1] before the RMS normalisation.
      fixed_axes: how the network treats spec axes labelled ``None``: ``"relax"`` gives each
        such axis a fresh label of its own (a larger symmetry group than the true one, so the
        network stays equivariant to the true group; the meta-parameter count then depends on no
        size at all); ``"channels"`` keeps them fixed, so the weight-space layer treats their
        positions as extra channels (exact, but the count grows with e.g. 64 pixels or a 256
        vocabulary). ``nfn`` always uses the spec as given: its NP layer handles input and
        output neurons itself.
      network_scale: ``"none"`` (paper): the update is ``alpha * (m + beta * f)``; f sees
        RMS-normalised inputs, so its size is the same whether the gradients are large or
        vanishing, and a rule meta-trained on short runs keeps taking full-size steps long
        after the loss has converged. ``"momentum_rms"``: ``alpha * (m + beta * rms(m) * f)``
        with ``rms(m)`` the root mean square of the nominal momentum over each tensor, so the
        network term shrinks with the gradients exactly like the nominal term and its size
        relative to it is ``beta * |f|``. ``"normalised"``: ``alpha * (m + beta * rms(m) *
        f / rms(f))``, so that the network term's size relative to the nominal term is exactly
        ``|beta|`` on every tensor at every step, whatever f outputs on inputs unlike those of
        meta-training (Celo2 normalises its MLP's output per tensor the same way); f only
        chooses the direction.
      network_tangent: remove from the network's output, per tensor, its component along the
        tensor's weights, ``f - (<f, W> / <W, W>) W``, so that the network term cannot grow or
        shrink the weights (to first order). Without it, rules meta-trained on episodes of at
        most 2,000 steps learnt to inflate the weights (the network term pointed along +W,
        cosine 0.91-0.95; the weight norm grew 60x in 10,000 steps): a quick gain on short runs that
        leaves long runs worse than plain SGDM (README, experiment 1).
      adam_features: give f, for each feature momentum ``m_d``, the channel
        ``m_d / sqrt(v)`` with ``v`` the mean squared gradient (decay 0.999): Adam's direction
        at that momentum's timescale (VeLO and Celo feed such ratios). The paper's features are
        all normalised per tensor, so without these f cannot see how large one parameter's
        gradients are relative to its own history, which is what Adam's preconditioning uses.
        ``v`` is kept as one more trailing channel of ``feature_momenta``.
      progress_centres: training-progress input (VeLO), off when empty. With centres c the
        optimizer needs the run's total number of steps (``as_optax(meta, num_steps=N)``) and
        uses ``e = tanh(10 (t / N - c))`` twice: as extra input channels of f, and as a learned
        schedule of the whole update, ``alpha_t = alpha * exp(progress_gain . e)``
        (``progress_gain`` starts at 0, so the initial rule is unchanged). Meta-trained on
        episodes of several lengths, the rule can then decay its steps in relative time, which
        carries over to runs longer than any it was trained on.
        ``features.PROGRESS_CENTRES`` are VeLO's.
    """

    hidden_features: int = 32
    num_layers: int = 4
    momentum_decays: tuple[float, ...] = feats.MOMENTUM_DECAYS
    step_timescales: tuple[float, ...] = feats.STEP_TIMESCALES
    init_alpha: float = 0.1
    init_beta: float = 0.001
    init_decay: float = 0.9
    momentum_form: str = "sum"
    clip_features: bool = True
    fixed_axes: str = "relax"
    network_scale: str = "none"
    network_tangent: bool = False
    adam_features: bool = False
    progress_centres: tuple[float, ...] = ()

    def __post_init__(self):
        # Lists (e.g. from JSON) become tuples so that the config stays hashable.
        object.__setattr__(self, "momentum_decays", tuple(float(d) for d in self.momentum_decays))
        object.__setattr__(self, "step_timescales", tuple(float(s) for s in self.step_timescales))
        object.__setattr__(self, "progress_centres",
                           tuple(float(c) for c in self.progress_centres))
        if self.hidden_features < 1:
            raise ValueError(f"hidden_features must be >= 1, got {self.hidden_features}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not all(0.0 < d < 1.0 for d in self.momentum_decays):
            raise ValueError(f"momentum_decays must lie in (0, 1), got {self.momentum_decays}")
        if not all(s > 0 for s in self.step_timescales):
            raise ValueError(f"step_timescales must be positive, got {self.step_timescales}")
        if not self.init_alpha > 0:
            raise ValueError(f"init_alpha must be > 0, got {self.init_alpha}")
        if not 0.0 < self.init_decay < 1.0:
            raise ValueError(f"init_decay must lie in (0, 1), got {self.init_decay}")
        if not all(math.isfinite(c) for c in self.progress_centres):
            raise ValueError(f"progress_centres must be finite, got {self.progress_centres}")
        for name, table in CHOICES.items():
            if getattr(self, name) not in table:
                raise ValueError(
                    f"{name} must be one of {tuple(table)}, got {getattr(self, name)!r}")

    @property
    def num_features(self) -> int:
        return feats.num_features(len(self.momentum_decays), len(self.step_timescales),
                                  len(self.progress_centres), self.adam_features)


def check_num_steps(num_steps) -> None:
    """``ValueError`` unless ``num_steps`` (a run's length) is ``None``, traced, or a number >= 1
    (Python, numpy or concrete jax: a numpy zero must not pass where a Python zero fails)."""
    import jax
    import numpy as np

    if num_steps is None or isinstance(num_steps, jax.core.Tracer):
        return
    value = np.asarray(num_steps)
    if value.shape != () or not value >= 1:
        raise ValueError(f"num_steps must be a number >= 1, got {num_steps!r}")


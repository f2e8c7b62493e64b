"""Named update rules: sets of :class:`~learned_opt.config.LearnedOptimizerConfig` options.

* ``paper``: the paper's rule, the config's defaults (no options). The README's ablation shows
  that it does not hold up past its meta-training horizon: f sees RMS-normalised inputs, so it
  keeps taking full-size steps after the loss has converged, and it learns to inflate the
  weights.
* ``recommended``: experiment 1's rule, given to every method there. The network term scaled
  by rms(m) (``network_scale="momentum_rms"``) and kept tangent to the weights
  (``network_tangent``), a step embedding that saturates within the shortest episode, training
  progress (``progress_centres``: the learned schedule and f's progress channels; sgdm gets the
  schedule alone; the optimizer then needs the run's length), and unclipped features (clipping
  to [-1, 1] before the per-tensor RMS makes the weight channel scale-dependent; without it the
  rule holds up at 5T: README ablation, mlp_fmnist unf 0.4379 -> 0.3721 at T=10000 with 3,000
  outer steps).
* ``recommended_fixed_horizon``: ``recommended`` without training progress, for runs whose
  length is not known in advance (``make demo`` meta-trains it).
* ``unf_universal_4tasks``: the rule of the shipped optimizer of that name
  (``recommended``, starting at SGDM with learning rate 0.03, where no member of the four
  tasks diverges).

Example:
  >>> import jax.numpy as jnp, learned_opt
  >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  >>> lopt = learned_opt.learned_optimizer("unf", params, **get("recommended_fixed_horizon"))
  >>> lopt.config.network_scale, lopt.config.network_tangent
  ('momentum_rms', True)
  >>> list_presets()
  ['paper', 'recommended', 'recommended_fixed_horizon', 'unf_universal_4tasks']
"""

from __future__ import annotations

from typing import Any

from learned_opt.features import PROGRESS_CENTRES

_FIXED_HORIZON: dict[str, Any] = {
    "network_scale": "momentum_rms",
    "network_tangent": True,
    "step_timescales": (1, 3, 10, 30, 100, 300),
    "clip_features": False,
}

_RECOMMENDED = _FIXED_HORIZON | {"progress_centres": PROGRESS_CENTRES}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "recommended": _RECOMMENDED,
    "recommended_fixed_horizon": _FIXED_HORIZON,
    "unf_universal_4tasks": _RECOMMENDED | {"init_alpha": 0.03},
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(PRESETS)


def get(name: str) -> dict[str, Any]:
    """The options of the preset ``name`` (a new dict: ``learned_optimizer(..., **get(name))``,
    or ``MetaTrainConfig(optimizer_args=get(name))``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list_presets()}")
    return dict(PRESETS[name])

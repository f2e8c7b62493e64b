"""The update rule's options, each a small function registered under its config value.

:class:`~learned_opt.config.LearnedOptimizerConfig` names one entry of each table and accepts
only their keys; :class:`~learned_opt.optimizer.LearnedOptimizer` looks the function up:

* ``MOMENTUM_FORMS[momentum_form](decay)``: the gradient's weight in the nominal momentum,
  ``m <- decay * m + weight * g``;
* ``NETWORK_TANGENTS[network_tangent](f, w)``: the network's output per tensor, or its part
  orthogonal to the tensor's weights;
* ``NETWORK_SCALES[network_scale](f, m)``: the network term per tensor before ``beta``, given
  the nominal momentum ``m``;
* ``FIXED_AXES[fixed_axes](spec)``: the spec the update network sees.

Example:
  >>> import jax.numpy as jnp
  >>> f, m = jnp.array([3.0, 4.0]), jnp.array([0.1, -0.1])
  >>> out = NETWORK_SCALES["normalised"](f, m) / rms(m)  # rms 1: f only gives the direction
  >>> [round(float(v), 4) for v in out]
  [0.8485, 1.1314]
  >>> float(jnp.vdot(NETWORK_TANGENTS[True](f, jnp.array([1.0, 0.0])), jnp.array([1.0, 0.0])))
  0.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from learned_opt.weight_space import relax_fixed_axes


def rms(x: jax.Array) -> jax.Array:
    """Root mean square over the whole tensor (invariant under permutations of its axes)."""
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def tangent(f: jax.Array, w: jax.Array) -> jax.Array:
    """``f`` minus its projection on ``w`` (whole-tensor inner products: permutation invariant)."""
    w = w.astype(jnp.float32)
    return f - jnp.vdot(f, w) / jnp.maximum(jnp.vdot(w, w), 1e-30) * w


# m <- decay * m + weight * g. "sum": the paper's formula (alpha = 0.1 is SGDM at lr 0.1);
# "average": the public code's (the same alpha then acts like a 10x smaller learning rate).
MOMENTUM_FORMS: dict[str, Callable[[jax.Array], Any]] = {
    "sum": lambda decay: 1.0,
    "average": lambda decay: 1.0 - decay,
}

NETWORK_TANGENTS: dict[bool, Callable[[jax.Array, jax.Array], jax.Array]] = {
    False: lambda f, w: f,
    True: tangent,
}

# "none": f as it is (the paper); "momentum_rms": f * rms(m), so the term shrinks with the
# gradients like the nominal one; "normalised": f * rms(m) / rms(f), so its size relative to the
# nominal term is exactly |beta| (f only chooses the direction).
NETWORK_SCALES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "none": lambda f, m: f,
    "momentum_rms": lambda f, m: f * rms(m),
    "normalised": lambda f, m: f * (rms(m) / jnp.maximum(rms(f), 1e-30)),
}

# "relax": every fixed axis permuted on its own (the network's size depends on no size);
# "channels": fixed axes kept, their positions act as channels of the weight-space layer.
FIXED_AXES: dict[str, Callable[[Any], Any]] = {
    "relax": relax_fixed_axes,
    "channels": lambda spec: spec,
}

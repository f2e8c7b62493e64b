"""Per-parameter input features of the learned optimizers (PAPER_NOTES section 3).

For every parameter tensor the update network sees ``leaf_shape + (19,)`` channels:

* 8 "state" channels: the weight, the gradient and 6 gradient momenta (averaging form,
  decays 0.1 ... 0.9999). Each is clipped to [-1, 1] (public code) and then divided by its own
  root mean square over the tensor, so that every channel has unit scale whatever the
  parameter's or the gradient's scale. The statistics are taken over whole tensors, which are
  invariant under any permutation of their axes: the features stay equivariant.
* 11 step channels: ``tanh(t / s - 1)`` for timescales s = 1, 3, 10, ..., 100000 (public code;
  the paper says "sinusoidal"), the same value for every parameter.
* optionally (``adam_features``), one channel per momentum: ``m_d / (sqrt(v) + eps)`` with ``v``
  the averaging-form mean of g^2 (decay 0.999), i.e. Adam's direction at each momentum's
  timescale, RMS-normalised per tensor but not clipped (it is scale-free already);
* optionally, training-progress channels (VeLO): ``tanh(10 (p - c))`` of the fraction
  ``p = t / num_steps`` of the run done, for centres c, when the user gives ``num_steps``.

Example:
  >>> import jax.numpy as jnp
  >>> step_embedding(jnp.int32(0), (1.0, 10.0)).shape
  (2,)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

PyTree = object

MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
STEP_TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
# VeLO's fractional embedding (learned_optimization, hyper_v2 ``_fractional_tanh_embed``).
SECOND_MOMENT_DECAY = 0.999  # Adam's beta2, for the adam_features channels
_ADAM_EPS = 1e-8  # Adam's epsilon: keeps never-updated parameters (v = 0) at 0
PROGRESS_CENTRES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
_EPS = 1e-12  # keeps the normaliser finite for all-zero channels (e.g. zero biases at init)


def num_features(num_decays: int, num_timescales: int, num_progress: int = 0,
                 adam: bool = False) -> int:
    """Input channels: weight, gradient, one per momentum (two with ``adam``), timescale and
    progress centre."""
    return num_state_channels(num_decays, adam) + num_timescales + num_progress


def num_state_channels(num_decays: int, adam: bool = False) -> int:
    """Per-parameter channels: weight, gradient, the momenta and (``adam``) their Adam ratios."""
    return 2 + num_decays * (2 if adam else 1)


def init_momenta(params: PyTree, num_decays: int) -> PyTree:
    """Zero momenta, one trailing channel per decay: leaves ``leaf_shape + (num_decays,)``."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p) + (num_decays,), jnp.float32), params)


def update_momenta(momenta: PyTree, grads: PyTree, decays: Sequence[float]) -> PyTree:
    """Averaging-form momenta ``v <- d * v + (1 - d) * g`` for every decay d at once.

    The averaging form keeps every momentum on the gradient's scale, so clipping to [-1, 1]
    treats them alike (with the sum form the 0.9999 momentum would be 10^4 gradients).
    """
    d = jnp.asarray(decays, jnp.float32)
    return jax.tree.map(lambda v, g: d * v + (1.0 - d) * g.astype(jnp.float32)[..., None],
                        momenta, grads)


def update_second_moment(second_moment: PyTree, grads: PyTree,
                         decay: float = SECOND_MOMENT_DECAY) -> PyTree:
    """Averaging-form mean of the squared gradient, ``v <- d * v + (1 - d) * g^2``.

    No bias correction: the channels built from it are RMS-normalised per tensor, which
    cancels any factor common to a tensor.
    """
    return jax.tree.map(lambda v, g: decay * v + (1.0 - decay) * jnp.square(g.astype(jnp.float32)),
                        second_moment, grads)


def adam_features(momenta: PyTree, second_moment: PyTree) -> PyTree:
    """``m_d / (sqrt(v) + eps)`` for every momentum, RMS-normalised per tensor (not clipped).

    Args:
      momenta: leaves ``leaf_shape + (num_decays,)`` (:func:`update_momenta`).
      second_moment: leaves ``leaf_shape`` (:func:`update_second_moment`).

    Example:
      >>> m = {"w": jnp.array([[2.0], [-1.0]])}
      >>> v = {"w": jnp.array([4.0, 1.0])}
      >>> adam_features(m, v)["w"][:, 0].round(3).tolist()   # ratios (1, -1), RMS 1
      [1.0, -1.0]
    """
    return jax.tree.map(
        lambda m, v: _normalise(m / (jnp.sqrt(v)[..., None] + _ADAM_EPS), clip=False),
        momenta, second_moment)


def step_embedding(step: jax.Array, timescales: Sequence[float]) -> jax.Array:
    """``tanh(step / s - 1)`` for each timescale s: shape ``(len(timescales),)``."""
    s = jnp.asarray(timescales, jnp.float32)
    return jnp.tanh(jnp.asarray(step, jnp.float32) / s - 1.0)


def progress_embedding(step: jax.Array, num_steps: jax.Array,
                       centres: Sequence[float]) -> jax.Array:
    """``tanh(10 (p - c))`` for each centre c, ``p = step / num_steps`` clipped to [0, 1].

    Clipping keeps a run that continues past ``num_steps`` on the embedding of its last step,
    a value seen in meta-training. Shape ``(len(centres),)``.

    Example:
      >>> progress_embedding(jnp.int32(50), jnp.int32(100), (0.5,)).tolist()
      [0.0]
    """
    p = jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(num_steps, jnp.float32), 1.0)
    c = jnp.asarray(centres, jnp.float32)
    return jnp.tanh(10.0 * (jnp.clip(p, 0.0, 1.0) - c))


def _normalise(x: jax.Array, clip: bool) -> jax.Array:
    """Clip (optionally) then divide each channel by its RMS over the tensor's elements."""
    if clip:
        x = jnp.clip(x, -1.0, 1.0)
    axes = tuple(range(x.ndim - 1))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + _EPS)


def state_features(params: PyTree, grads: PyTree, momenta: PyTree,
                   clip: bool = True) -> PyTree:
    """The 8 normalised state channels: leaves ``leaf_shape + (2 + num_decays,)``.

    Args:
      params, grads: the weight space and its gradient (same structure).
      momenta: output of :func:`update_momenta` (leaves ``leaf_shape + (num_decays,)``).
      clip: clip the channels to [-1, 1] before normalising (public code does).
    """

    def leaf(p, g, v):
        x = jnp.concatenate(
            [p.astype(jnp.float32)[..., None], g.astype(jnp.float32)[..., None], v], axis=-1)
        return _normalise(x, clip)

    return jax.tree.map(leaf, params, grads, momenta)


def build_features(params: PyTree, grads: PyTree, momenta: PyTree, step: jax.Array,
                   timescales: Sequence[float], clip: bool = True) -> PyTree:
    """All input channels: leaves ``leaf_shape + (2 + num_decays + num_timescales,)``.

    The state channels of :func:`state_features` followed by the step embedding, broadcast to
    every parameter.
    """
    emb = step_embedding(step, timescales)
    return jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.broadcast_to(emb, x.shape[:-1] + emb.shape)], -1),
        state_features(params, grads, momenta, clip))

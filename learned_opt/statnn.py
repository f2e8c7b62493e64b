"""STATNN features: simple statistics of every weight tensor (Unterthiner et al. 2020).

The baseline generalisation predictor of the paper's RNN-zoo experiment: for every tensor of a
network, its mean, variance and 0/25/50/75/100 percentiles, concatenated in the pytree's
flattening order (7 numbers per tensor). The features are invariant to every permutation of
any axis of any tensor, so they are invariant to the network's neuron permutations too.

Example:
  >>> import jax.numpy as jnp
  >>> params = {"w": jnp.arange(5.0), "b": jnp.zeros(2)}
  >>> feats = statnn_features(params).reshape(2, 7)  # "b" first: dict keys are sorted
  >>> feats[1].tolist()  # "w" = [0, 1, 2, 3, 4]: mean, var, quartiles
  [2.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from learned_opt.spec import flatten_with_spec

PyTree = Any

FEATURE_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100")
QUANTILES = (0.0, 25.0, 50.0, 75.0, 100.0)


def tensor_statistics(x: jax.Array) -> jax.Array:
    """[7]: mean, variance and 0/25/50/75/100 percentiles of all entries of ``x``."""
    x = jnp.ravel(x)
    q = jnp.percentile(x, jnp.asarray(QUANTILES, x.dtype))
    return jnp.concatenate([jnp.stack([jnp.mean(x), jnp.var(x)]), q])


def statnn_features(params: PyTree, spec: PyTree | None = None) -> jax.Array:
    """STATNN feature vector of one network: ``7 * number_of_tensors`` numbers.

    Args:
      params: pytree of arrays (one network; ``jax.vmap`` this function for a batch).
      spec: optional permutation spec; when given it is only checked against ``params``
        (the features need no spec, since they are invariant to any permutation of entries).

    Returns:
      float array [7 * num_leaves], tensor by tensor in flattening order, each tensor's
      statistics in the order of ``FEATURE_NAMES``.

    Raises:
      PermSpecError: if ``spec`` is given and does not match ``params``.
      ValueError: if a tensor is empty.
    """
    if spec is not None:
        flatten_with_spec(params, spec)  # raises PermSpecError naming the mismatched leaf
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [x for _, x in paths_leaves]
    paths = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
    if not leaves:
        raise ValueError("statnn_features: params has no tensors")
    for path, x in zip(paths, leaves, strict=True):
        if jnp.size(x) == 0:
            raise ValueError(f"statnn_features: tensor {path} is empty (shape {jnp.shape(x)})")
    return jnp.concatenate([tensor_statistics(jnp.asarray(x)) for x in leaves])

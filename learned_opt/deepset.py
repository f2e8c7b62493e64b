"""The Deep Set layer on a weight space (Zaheer et al. 2017), a baseline for ``UNFLinear``.

Every tensor is treated as a set of its entries: each entry gets a linear map of its own
channels plus a linear map of the tensor's mean (over all its axes), plus a bias. The
weights are per leaf (not shared across leaves) and do not depend on any size, so the layer is
equivariant to every permutation of each tensor's entries, a much larger group than the
spec's; the spec is only validated. Same calling convention as ``UNFLinear``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = {"w": jnp.ones((3, 4, 2)), "b": jnp.ones((4, 2))}
  >>> spec = {"w": ("i", "h"), "b": ("h",)}
  >>> layer = DeepSetLinear(features=5)
  >>> y = layer.apply(layer.init(jax.random.key(0), x, spec), x, spec)
  >>> y["w"].shape, y["b"].shape
  ((3, 4, 5), (4, 5))
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from learned_opt.spec import flatten_with_spec, label_sizes

PyTree = Any


class DeepSetLinear(nn.Module):
    """``y = x @ W_elem + mean(x) @ W_mean + b`` for every leaf, with per-leaf weights.

    Attributes:
      features: output channels of every leaf.

    Init: both matrices normal with std ``1/sqrt(2 * c_in)`` (fan-in of the two terms
    together); bias zero. Parameters ``elem_{o}``, ``mean_{o}``, ``bias_{o}`` for leaf ``o``.
    """

    features: int

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> PyTree:
        label_sizes(x, spec, trailing_axes=1)  # PermSpecError naming the leaf on a bad spec
        _, arrays, _ = flatten_with_spec(x, spec)
        outs = []
        for o, a in enumerate(arrays):
            c_in = a.shape[-1]
            init = nn.initializers.normal(1.0 / math.sqrt(2 * c_in))
            w_elem = self.param(f"elem_{o}", init, (c_in, self.features))
            w_mean = self.param(f"mean_{o}", init, (c_in, self.features))
            bias = self.param(f"bias_{o}", nn.initializers.zeros, (self.features,))
            mean = jnp.mean(a.reshape(-1, c_in), axis=0)
            outs.append(a @ w_elem + (mean @ w_mean + bias))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x), outs)

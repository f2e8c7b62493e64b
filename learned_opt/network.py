"""The update network f of each learned-optimizer method (PAPER_NOTES section 3).

f maps the per-parameter input channels (:mod:`learned_opt.features`) and the step embedding to
one output channel per parameter: ``num_pointwise`` per-parameter Dense layers, then
weight-space layers (``UNFLinear``, ``DeepSetLinear``, ...), ReLU between. :data:`METHODS` says
which layout each method uses.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from learned_opt.unf import UNFLinear
  >>> state = {"w": jnp.ones((4, 3, 8)), "b": jnp.ones((3, 8))}  # 8 state channels
  >>> spec = {"w": ("i", "h"), "b": ("h",)}
  >>> net = UpdateNetwork(UNFLinear, hidden_features=16, num_layers=3, num_pointwise=2)
  >>> emb = jnp.zeros(5)  # step embedding
  >>> variables = net.init(jax.random.key(0), state, emb, spec)
  >>> net.apply(variables, state, emb, spec)["w"].shape
  (4, 3, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.deepset import DeepSetLinear
from learned_opt.direction import METHODS as DIRECTION_METHODS
from learned_opt.nfn import NFNLinear
from learned_opt.unf import UNFLinear
from learned_opt.universal import UniversalDeepSetLinear, UniversalUNFLinear

PyTree = Any


class Method(NamedTuple):
    """The update network of one method."""

    # Leading per-parameter Dense layers; -1: all but the last (the paper's layout, whatever
    # ``num_layers`` is).
    num_pointwise: int
    layer: Callable | None  # the weight-space layer class; None: no network at all (sgdm)
    agnostic: bool = False  # meta-parameters of the same shapes for every weight space
    # The layer gets the spec as given, whatever ``fixed_axes`` says (nfn: its NP layer handles
    # input and output neurons itself).
    keeps_spec: bool = False


METHODS: dict[str, Method] = {
    "sgdm": Method(0, None, agnostic=True),
    "deepset": Method(-1, DeepSetLinear),
    "unf": Method(-1, UNFLinear),
    "unf_deep": Method(0, UNFLinear),
    "nfn": Method(-1, NFNLinear, keeps_spec=True),
    "unf_universal": Method(-1, UniversalUNFLinear, agnostic=True),
    "deepset_universal": Method(-1, UniversalDeepSetLinear, agnostic=True),
}


def list_optimizers() -> list[str]:
    """Names accepted by :func:`learned_opt.learned_optimizer`."""
    return sorted([*METHODS, *DIRECTION_METHODS])


def list_agnostic_optimizers() -> list[str]:
    """Methods whose meta-parameters fit every weight space (:func:`learned_opt.agnostic_optax`)."""
    return sorted([*(n for n, m in METHODS.items() if m.agnostic), *DIRECTION_METHODS])


def build_network(method: Method, hidden_features: int, num_layers: int
                  ) -> UpdateNetwork | None:
    """The update network of ``method`` (``None`` for a method without one)."""
    if method.layer is None:
        return None
    num_pointwise = num_layers - 1 if method.num_pointwise < 0 else method.num_pointwise
    return UpdateNetwork(method.layer, hidden_features, num_layers, num_pointwise)


class _FirstDense(nn.Module):
    """Per-parameter Dense on ``[state channels, step embedding]`` without materialising it.

    Same parameters as ``nn.Dense(features)`` on the concatenation (kernel rows: state channels
    then embedding); the embedding is the same for every parameter, so its contribution is
    computed once and broadcast.
    """

    features: int

    @nn.compact
    def __call__(self, state: jax.Array, emb: jax.Array) -> jax.Array:
        n_state = state.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (n_state + emb.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return state @ kernel[:n_state] + (emb @ kernel[n_state:] + bias)


class UpdateNetwork(nn.Module):
    """f: ``num_pointwise`` per-parameter Dense layers, then weight-space layers; ReLU between.

    Input: ``state`` leaves ``leaf_shape + (c_state,)`` and the step embedding ``emb`` (one
    vector for all parameters; together they are the ``c_state + len(emb)`` input channels).
    Output leaves ``leaf_shape + (1,)``.
    """

    layer_cls: Callable
    hidden_features: int = 32
    num_layers: int = 4
    num_pointwise: int = 3

    @nn.compact
    def __call__(self, state: PyTree, emb: jax.Array, spec: PyTree) -> PyTree:
        x = state
        num_pointwise = min(self.num_pointwise, self.num_layers)
        if num_pointwise:
            # All per-parameter layers on one (parameters, channels) array, split into leaves
            # once: splitting after every layer cost a pass over the array per leaf (about a
            # third of the Transformer's update in the issue-10 profile).
            leaves, treedef = jax.tree.flatten(x)
            h = jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in leaves], axis=0)
            for i in range(num_pointwise):
                width = 1 if i == self.num_layers - 1 else self.hidden_features
                h = (_FirstDense(width, name="dense_0")(h, emb) if i == 0
                     else nn.Dense(width, name=f"dense_{i}")(h))
                if i < self.num_layers - 1:
                    h = nn.relu(h)
            sizes = [math.prod(v.shape[:-1]) for v in leaves]
            parts = jnp.split(h, np.cumsum(sizes)[:-1], axis=0)
            x = jax.tree.unflatten(treedef, [p.reshape(v.shape[:-1] + (h.shape[-1],))
                                             for p, v in zip(parts, leaves, strict=True)])
        for i in range(num_pointwise, self.num_layers):
            last = i == self.num_layers - 1
            if i == 0:
                x = jax.tree.map(lambda s: jnp.concatenate(
                    [s, jnp.broadcast_to(emb, s.shape[:-1] + emb.shape)], -1), x)
            x = self.layer_cls(1 if last else self.hidden_features, name=f"ws_{i}")(x, spec)
            if not last:
                x = jax.tree.map(nn.relu, x)
        return x


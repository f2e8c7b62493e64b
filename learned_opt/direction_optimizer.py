"""The learned-direction rule behind the inner-loop interface that meta-training uses.

:class:`DirectionOptimizer` has ``LearnedOptimizer``'s methods (``init``, ``init_state``,
``update``: pure, jittable, vmappable over meta-parameters) for the rule of
:mod:`learned_opt.direction`; :func:`learned_direction_optimizer` builds one by method name
(``direction_elementwise``, ``direction_deepset``, ``direction_unf``), as
``learned_opt.learned_optimizer`` does for every registered method.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  >>> lopt = learned_direction_optimizer("direction_elementwise", params)
  >>> lopt.num_meta_params()
  224
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.direction import (
    FEATURES,
    METHODS,
    SKIP_INIT_FEATURE,
    DirectionConfig,
    DirectionNetwork,
    DirectionState,
    direction_update,
    init_direction_state,
    learned_direction,
    net_spec_for,
    schedule_value,
)
from learned_opt.spec import path_str
from learned_opt.weight_space import WeightSpace, check_arrays

PyTree = Any

@dataclasses.dataclass(frozen=True, eq=False)
class DirectionOptimizer:
    """A learned-direction rule behind the inner-loop interface of ``LearnedOptimizer``
    (``init``, ``init_state``, ``update``; pure, jittable, vmappable over meta-parameters),
    which meta-training and checkpoints use. Built for one weight-space structure by
    :func:`learned_direction_optimizer`; its meta-parameters fit every weight space.

    ``update`` applies the whole default optimizer: ``-schedule(step) * (direction + wd p)``
    with :func:`default_schedule` over ``num_steps`` (the episode's length in meta-training).
    """

    name: str
    config: DirectionConfig
    perm_spec: PyTree
    net_spec: PyTree
    weight_space: WeightSpace

    agnostic = True

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Initial meta-parameters ``{"net": ...}``: Adam's direction (skip), readout zero."""
        return self._init_jit(key)

    @functools.cached_property
    def _init_jit(self):
        c = self.config

        def init(key):
            xs = [[jnp.zeros(shape, jnp.float32)] * len(FEATURES)
                  for shape in self.weight_space.shapes]
            net = DirectionNetwork(c.layer, c.hidden_features, c.num_hidden)
            params = net.init(key, xs, self.net_spec)["params"]
            params["readout"] = jax.tree.map(jnp.zeros_like, params["readout"])
            return {"net": params}

        return jax.jit(init)

    def nominal(self, meta_params) -> dict[str, jax.Array]:
        """Scalars to log: the skip weight on Adam's direction."""
        skip = meta_params["net"]["skip"]
        return {"skip_adam": skip[FEATURES.index(SKIP_INIT_FEATURE)],
                "skip_norm": jnp.sqrt(jnp.sum(jnp.square(skip)))}

    def init_state(self, meta_params, params: PyTree) -> DirectionState:
        del meta_params
        self.check_params(params)
        return init_direction_state(params)

    def check_params(self, params: PyTree, what: str = "params") -> None:
        """``PermSpecError`` naming the first leaf whose path or rank differs from the build's
        (:func:`scale_by_learned_direction` takes any weight space)."""
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        self.weight_space.check_structure([(path_str(p), x) for p, x in flat], what)
        check_arrays(params, what)

    def update(self, meta_params, state: DirectionState, grads: PyTree, params: PyTree,
               num_steps=None) -> tuple[PyTree, DirectionState]:
        direction, new = direction_update(meta_params, self.config, state, grads, params,
                                          self.net_spec)
        lr = schedule_value(self.config, state.step, num_steps)
        wd = self.config.weight_decay
        updates = jax.tree.map(
            lambda d, p: (-lr * (d.astype(jnp.float32) + wd * p.astype(jnp.float32))
                          ).astype(jnp.result_type(p)), direction, params)
        return updates, new

    def as_optax(self, meta_params, num_steps: int | None = None, perm_spec: PyTree = None,
                 learning_rate=None, weight_decay: float | None = None):
        """The default optimizer (:func:`learned_direction`) for any weight space."""
        return learned_direction(meta_params, self.config, num_steps, learning_rate,
                                 weight_decay, perm_spec)

    def num_meta_params(self, meta_params=None) -> int:
        if meta_params is None:
            meta_params = jax.eval_shape(self.init, jax.random.key(0))
        return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(meta_params))


def learned_direction_optimizer(name: str, params: PyTree, perm_spec: PyTree = None,
                                **config: Any) -> DirectionOptimizer:
    """Build the learned-direction method ``name`` (a key of ``METHODS``) for weight spaces
    structured like ``params``; ``**config``: :class:`DirectionConfig` fields (``layer`` is set
    by the name)."""
    if name not in METHODS:
        raise ValueError(f"unknown learned-direction method {name!r}; choose one of "
                         f"{sorted(METHODS)}")
    fields = {f.name for f in dataclasses.fields(DirectionConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; valid: {sorted(fields)}")
    if config.get("layer", METHODS[name]) != METHODS[name]:
        raise ValueError(f"{name!r} has layer {METHODS[name]!r}, got layer={config['layer']!r}")
    cfg = DirectionConfig(**(config | {"layer": METHODS[name]}))
    check_arrays(params)
    net_spec = net_spec_for(cfg.layer, params, perm_spec)
    if perm_spec is None:
        perm_spec = (jax.tree.map(lambda p: (None,) * np.ndim(p), params) if net_spec is None
                     else _inferred(params))
    return DirectionOptimizer(name, cfg, perm_spec, net_spec, WeightSpace.of(params, perm_spec))


def _inferred(params: PyTree) -> PyTree:
    from learned_opt.infer import infer_perm_spec

    return infer_perm_spec(params)

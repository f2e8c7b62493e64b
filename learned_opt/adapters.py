"""Learned optimizers as optax optimizers.

* :func:`as_optax`: one learned optimizer, bound to its weight space (``lopt.as_optax``);
* :func:`agnostic_optax`: a weight-space-agnostic method for ANY weight space, built for each
  structure it meets on first use.

Both updates need the current parameters: ``tx.update(grads, opt_state, params)``.

Example:
  >>> import jax, jax.numpy as jnp, optax, learned_opt
  >>> small = {"d0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  >>> meta = learned_opt.learned_optimizer("unf_universal", small).init(jax.random.key(0))
  >>> big = {"Dense_0": {"kernel": jnp.ones((5, 8)), "bias": jnp.zeros(8)},
  ...        "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
  >>> tx = agnostic_optax("unf_universal", meta)
  >>> state = tx.init(big)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, big), state, big)
  >>> updates["Dense_1"]["kernel"].shape
  (8, 2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.network import list_agnostic_optimizers
from learned_opt.spec import PermSpecError
from learned_opt.weight_space import check_not_masked

if TYPE_CHECKING:
    from learned_opt.optimizer import LearnedOptimizer

PyTree = Any


def is_masked(x: Any) -> bool:
    """Whether ``x`` is a leaf that ``optax.masked`` left out."""
    return isinstance(x, optax.MaskedNode)


def _require_params(name: str, params: PyTree) -> None:
    if params is None:
        raise ValueError(f"learned optimizer {name!r} needs the current parameters: call "
                         "tx.update(grads, opt_state, params)")


def as_optax(lopt: LearnedOptimizer, meta_params: dict[str, Any], num_steps: int | None = None,
             perm_spec: PyTree = None) -> optax.GradientTransformationExtraArgs:
    """``lopt`` with ``meta_params`` as an optax optimizer; its ``update`` needs ``params``.

    ``num_steps``: the total number of steps of the run, required by optimizers with
    ``progress_centres`` (they schedule their steps over it; steps past it reuse the last
    step's schedule); ignored by the others. ``perm_spec``: the spec of the parameters it
    will get, used only when their names differ from the optimizer's (``lopt.rekey``).
    """
    lopt.check_num_steps(num_steps)

    def init_fn(params):
        return lopt.init_state(meta_params, lopt.rekey(params, perm_spec))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _require_params(lopt.name, params)
        out, state = lopt.update(meta_params, state, lopt.rekey(updates, perm_spec),
                                 lopt.rekey(params, perm_spec), num_steps)
        return jax.tree.unflatten(jax.tree.structure(updates), jax.tree.leaves(out)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agnostic_optax(name: str, meta_params: dict[str, Any], perm_spec: PyTree = None,
                   num_steps: int | None = None, **config: Any
                   ) -> optax.GradientTransformationExtraArgs:
    """A weight-space-agnostic learned optimizer as an optax optimizer for ANY weight space.

    Args:
      name: one of :func:`learned_opt.list_agnostic_optimizers`.
      meta_params: its meta-parameters (from any weight space: their shapes do not depend on it).
      perm_spec: the permutation spec of the parameters it will train; ``None``: inferred from
        them by ``learned_opt.infer_perm_spec`` at ``init`` (``PermSpecError`` saying to pass
        one when that fails, e.g. for attention or residual connections).
      num_steps: the run's total number of steps (optimizers with ``progress_centres``).
      **config: the optimizer's :class:`~learned_opt.config.LearnedOptimizerConfig` fields.

    ``init(params)`` builds the optimizer for the structure of ``params`` (once per structure);
    ``update(grads, state, params)`` needs the parameters.
    """
    from learned_opt.optimizers import learned_optimizer  # the builder imports this module

    if name not in list_agnostic_optimizers():
        raise ValueError(f"{name!r} binds its meta-parameters to one weight space; the "
                         f"weight-space-agnostic methods are {list_agnostic_optimizers()}")
    built: dict = {}

    def lopt_for(params) -> LearnedOptimizer:
        flat, treedef = jax.tree_util.tree_flatten(params)
        key = (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in flat))
        if key not in built:
            spec = perm_spec
            if spec is None:
                check_not_masked(params)
                # From the caller's tree, whose key order is the model's call order (a copy made
                # by jax.tree.map is key-sorted, and inference would see another chain).
                from learned_opt.infer import infer_perm_spec

                try:
                    spec = infer_perm_spec(params)
                except PermSpecError:
                    spec = None  # learned_optimizer says to pass one
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
            built[key] = learned_optimizer(name, shapes, spec, **config)
        return built[key]

    def init_fn(params):
        return lopt_for(params).init_state(meta_params, params)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _require_params(name, params)
        return lopt_for(params).update(meta_params, state, updates, params, num_steps)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

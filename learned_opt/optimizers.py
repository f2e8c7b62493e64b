"""The learned-optimizer methods and their builder, :func:`learned_optimizer` (PAPER_NOTES 3).

Every method applies the nominal update of Harrison et al. (2022) used by the paper,
``W <- W - alpha * (m + beta * f(features))`` (:mod:`learned_opt.optimizer`), with ``f`` a
network on the whole weight space whose input is :mod:`learned_opt.features` (19 channels per
parameter). Methods differ only in ``f`` (:data:`learned_opt.network.METHODS`):

* ``sgdm``: no network, ``beta`` fixed to 0 (alpha and decay meta-learned);
* ``deepset``: 3 per-parameter Dense layers (19->32->32->32, ReLU), then ``DeepSetLinear(1)``;
* ``unf``: 3 per-parameter Dense layers, then ``UNFLinear(1)`` (the paper's UNF optimizer);
* ``unf_deep``: 4 ``UNFLinear`` layers (19->32->32->32->1, ReLU);
* ``nfn``: 3 per-parameter Dense layers, then ``NFNLinear(1)`` (MLP and CNN weight spaces);
* ``unf_universal``: 3 per-parameter Dense layers, then ``UniversalUNFLinear(1)``, whose
  coefficients are shared by map type (:mod:`learned_opt.universal`);
* ``deepset_universal``: the same with ``UniversalDeepSetLinear(1)``.

A ``LearnedOptimizer`` is built for one weight-space structure (leaf paths, ranks, spec labels);
label sizes are free, so an optimizer built on a 32-unit MLP updates a 128-unit MLP. The
meta-parameters of the *weight-space-agnostic* methods (:func:`list_agnostic_optimizers`) have
the same shapes for every weight space, so one set of them trains any architecture:
:func:`~learned_opt.adapters.agnostic_optax` builds the per-structure optimizer on first use.

Where the parts live: the options in :mod:`learned_opt.config` (named sets of them in
:mod:`learned_opt.presets`, their functions in :mod:`learned_opt.rules`), the network in
:mod:`learned_opt.network`, the update rule in :mod:`learned_opt.optimizer`, the optax adapters
in :mod:`learned_opt.adapters`, the weight-space structure in :mod:`learned_opt.weight_space`.

Example:
  >>> import jax, jax.numpy as jnp, learned_opt
  >>> params = {"d0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
  ...           "d1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> spec = {"d0": {"kernel": (None, "h"), "bias": ("h",)},
  ...         "d1": {"kernel": ("h", None), "bias": (None,)}}
  >>> lopt = learned_opt.learned_optimizer("unf", params, spec)
  >>> meta = lopt.init(jax.random.key(0))
  >>> state = lopt.init_state(meta, params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = lopt.update(meta, state, grads, params)
  >>> updates["d0"]["kernel"].shape
  (4, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from learned_opt.adapters import agnostic_optax
from learned_opt.config import LearnedOptimizerConfig
from learned_opt.direction import METHODS as DIRECTION_METHODS
from learned_opt.direction_optimizer import learned_direction_optimizer
from learned_opt.network import (
    METHODS,
    UpdateNetwork,
    build_network,
    list_agnostic_optimizers,
    list_optimizers,
)
from learned_opt.optimizer import LearnedOptimizer, LearnedOptimizerState
from learned_opt.rules import FIXED_AXES
from learned_opt.spec import PermSpecError
from learned_opt.weight_space import WeightSpace, check_arrays, relax_fixed_axes

# Names this module held before the split (learned_opt.optimizers.X keeps working).
__all__ = ["LearnedOptimizer", "LearnedOptimizerConfig", "LearnedOptimizerState", "UpdateNetwork",
           "agnostic_optax", "learned_optimizer", "list_agnostic_optimizers", "list_optimizers",
           "relax_fixed_axes"]

PyTree = Any


def _all_none_spec(params: PyTree) -> PyTree:
    return jax.tree.map(lambda p: (None,) * len(np.shape(p)), params)


def learned_optimizer(name: str, params: PyTree, perm_spec: PyTree = None,
                      **config: Any) -> LearnedOptimizer:
    """Build the learned optimizer ``name`` for weight spaces structured like ``params``.

    Args:
      name: one of :func:`list_optimizers`.
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct``) fixing the structure.
      perm_spec: its permutation spec (``task.perm_spec``, or the paper's over-symmetric
        ``task.paper_perm_spec``). ``None``: inferred with ``learned_opt.infer_perm_spec`` for
        the network methods, not needed for ``sgdm``.
      **config: fields of :class:`LearnedOptimizerConfig`.

    Raises:
      ValueError: unknown name or option; ``PermSpecError`` for a spec that does not fit, or a
      weight space the method cannot handle (``nfn`` outside MLP/CNN).
    """
    if name in DIRECTION_METHODS:
        return learned_direction_optimizer(name, params, perm_spec, **config)
    if name not in METHODS:
        raise ValueError(f"unknown learned optimizer {name!r}; choose one of {list_optimizers()}")
    fields = {f.name for f in dataclasses.fields(LearnedOptimizerConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for learned_optimizer; valid: "
                         f"{sorted(fields)}")
    cfg = LearnedOptimizerConfig(**config)
    method = METHODS[name]
    if method.agnostic and method.layer is not None and cfg.fixed_axes != "relax":
        raise ValueError(f"learned optimizer {name!r} is weight-space agnostic: it treats fixed "
                         f"axes as permuted on their own; fixed_axes={cfg.fixed_axes!r} would "
                         "tie its meta-parameters to their sizes (use 'relax')")
    check_arrays(params)  # before inferring a spec, whose errors would be less clear
    if perm_spec is None:
        if method.layer is None:
            perm_spec = _all_none_spec(params)
        else:
            from learned_opt.infer import infer_perm_spec

            try:
                perm_spec = infer_perm_spec(params)
            except Exception as e:  # any failure to infer: ask for an explicit spec
                raise PermSpecError(
                    f"learned optimizer {name!r} needs a permutation spec and none could be "
                    f"inferred ({type(e).__name__}: {e}); pass perm_spec=...") from e
    space = WeightSpace.of(params, perm_spec)
    net_spec = perm_spec if method.keeps_spec else FIXED_AXES[cfg.fixed_axes](perm_spec)
    network = build_network(method, cfg.hidden_features, cfg.num_layers)
    lopt = LearnedOptimizer(name, cfg, perm_spec, net_spec, space, network)
    if network is not None:
        # Trace the network once now, so that a weight space the method cannot handle fails at
        # build time with the layer's own message rather than inside the first jitted step.
        try:
            jax.eval_shape(lopt.init, jax.random.key(0))
        except PermSpecError as e:
            raise PermSpecError(f"learned optimizer {name!r} cannot handle this weight space"
                                + (" (nfn supports MLP and CNN weight spaces only)"
                                   if name == "nfn" else "") + f": {e}") from e
    return lopt

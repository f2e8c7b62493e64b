"""The update rule of a learned optimizer: ``init`` / ``init_state`` / ``update``.

Every method applies the nominal update of Harrison et al. (2022) used by the paper::

    m  <- decay * m + g                          (sum form: alpha = 0.1 is SGDM at lr 0.1)
    W  <- W - alpha * (m + beta * f(features))

with ``alpha``, ``beta`` and ``decay`` meta-learned (stored as ``log_alpha``, ``beta`` and
``logit_decay`` so that every value of the meta-parameters is valid) and ``f`` the update
network (:mod:`learned_opt.network`) on the whole weight space, whose input is
:mod:`learned_opt.features`. The config's options pick small functions from the tables of
:mod:`learned_opt.rules`; :func:`learned_opt.learned_optimizer` builds a
:class:`LearnedOptimizer`.

Example:
  >>> import jax, jax.numpy as jnp, learned_opt
  >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  >>> lopt = learned_opt.learned_optimizer("sgdm", params)  # alpha 0.1, decay 0.9
  >>> meta = lopt.init(jax.random.key(0))
  >>> state = lopt.init_state(meta, params)
  >>> updates, state = lopt.update(meta, state, jax.tree.map(jnp.ones_like, params), params)
  >>> [round(float(u), 4) for u in updates["b"]]  # -alpha * g: SGDM's first step
  [-0.1, -0.1, -0.1]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import adapters, rules
from learned_opt import features as feats
from learned_opt.config import LearnedOptimizerConfig, check_num_steps
from learned_opt.network import METHODS, UpdateNetwork, list_agnostic_optimizers
from learned_opt.spec import PermSpecError, label_sizes, path_str
from learned_opt.weight_space import WeightSpace, check_arrays

PyTree = Any


class LearnedOptimizerState(NamedTuple):
    """Inner-loop state of a learned optimizer."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    momentum: PyTree  # nominal momentum, like params (float32)
    # like params with a trailing axis of len(momentum_decays) (+1 for v with adam_features);
    # () for sgdm
    feature_momenta: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class LearnedOptimizer:
    """A learned optimizer for one weight-space structure; build it with :func:`learned_optimizer`.

    All methods are pure functions of their arguments (the meta-parameters are always passed
    in), jittable, and vmappable over a population of meta-parameters.

    Attributes:
      name: method name (see :func:`list_optimizers`).
      config: :class:`LearnedOptimizerConfig`.
      perm_spec: the permutation spec given at build (all ``None`` for sgdm without a spec).
      net_spec: the spec the update network sees (``perm_spec`` after ``config.fixed_axes``).
      weight_space: the :class:`~learned_opt.weight_space.WeightSpace` (leaf paths, shapes at
        build time, labels of ``perm_spec``).
      network: the update network (``None`` for sgdm).
    """

    name: str
    config: LearnedOptimizerConfig
    perm_spec: PyTree
    net_spec: PyTree
    weight_space: WeightSpace
    network: UpdateNetwork | None

    @property
    def agnostic(self) -> bool:
        """Whether the meta-parameters fit every weight space (see :func:`agnostic_optax`)."""
        return METHODS[self.name].agnostic

    # ------------------------------------------------------------------ checks
    def check_params(self, params: PyTree, what: str = "params") -> None:
        """Raise ``PermSpecError`` naming the first leaf where ``params`` differ in structure.

        Structure means leaf paths, ranks and consistent label sizes; permuted label sizes may
        differ from the ones seen at build. Fixed axes whose size enters the network's
        parameters (``fixed_axes="channels"``, ``nfn``) must keep their size. Leaves must be
        floating point and non-empty (``ValueError`` otherwise).
        """
        flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=adapters.is_masked)
        got = [(path_str(p), x) for p, x in flat]
        if any(adapters.is_masked(x) for _, x in got):
            masked = next(p for p, x in got if adapters.is_masked(x))
            raise PermSpecError(
                f"learned optimizer {self.name!r} got a masked weight space (leaf {masked} is "
                "masked out): it needs every leaf it was built for, because its update network "
                "couples all tensors. Wrap the other transformations in optax.masked instead.")
        self.weight_space.check_structure(got, what)
        check_arrays(params, what)
        label_sizes(params, self.net_spec)  # one size per label, with the leaf named otherwise
        if self.network is not None:
            self.weight_space.check_fixed_sizes(got, self.net_spec, what)

    # ------------------------------------------------------------------ meta-parameters
    def init(self, key: jax.Array) -> dict[str, Any]:
        """Initial meta-parameters: a plain dict of float32 arrays.

        Keys: ``log_alpha``, ``logit_decay``; for methods with a network, ``beta`` (linear,
        so ``beta = 0`` switches the network term off) and ``net`` (the network's parameters);
        with ``progress_centres``, ``progress_gain`` (zeros: no schedule at first).
        """
        c = self.config
        meta = {
            "log_alpha": jnp.asarray(math.log(c.init_alpha), jnp.float32),
            "logit_decay": jnp.asarray(math.log(c.init_decay / (1 - c.init_decay)), jnp.float32),
        }
        if self.network is not None:
            meta["beta"] = jnp.asarray(c.init_beta, jnp.float32)
            meta["net"] = self._init_network(key)
        if c.progress_centres:
            meta["progress_gain"] = jnp.zeros((len(c.progress_centres),), jnp.float32)
        return meta

    @functools.cached_property
    def _init_network(self) -> Callable[[jax.Array], PyTree]:
        # Jitted once per optimizer: initialising op by op costs seconds on CPU.
        def init_network(key):
            c = self.config
            channels = feats.num_state_channels(len(c.momentum_decays), c.adam_features)
            x = self.weight_space.unflatten(
                [jnp.zeros(shape + (channels,), jnp.float32) for shape in self.weight_space.shapes])
            emb = jnp.zeros((len(c.step_timescales) + len(c.progress_centres),), jnp.float32)
            return self.network.init(key, x, emb, self.net_spec)["params"]

        return jax.jit(init_network)

    def nominal(self, meta_params: dict[str, Any]) -> dict[str, jax.Array]:
        """``dict(alpha, beta, decay)`` as jnp scalars (for logging)."""
        return dict(
            alpha=jnp.exp(meta_params["log_alpha"]),
            beta=jnp.asarray(meta_params.get("beta", 0.0), jnp.float32),
            decay=jax.nn.sigmoid(meta_params["logit_decay"]),
        )

    # ------------------------------------------------------------------ inner loop
    def init_state(self, meta_params: dict[str, Any], params: PyTree) -> LearnedOptimizerState:
        """Zero momenta and step 0 for ``params`` (any sizes of the same structure)."""
        del meta_params  # the state does not depend on them; kept for a uniform signature
        self.check_params(params)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        fm = () if self.network is None else feats.init_momenta(
            params, len(self.config.momentum_decays) + self.config.adam_features)
        return LearnedOptimizerState(step=jnp.zeros((), jnp.int32), momentum=zeros,
                                     feature_momenta=fm)

    def update(self, meta_params: dict[str, Any], state: LearnedOptimizerState, grads: PyTree,
               params: PyTree, num_steps: jax.Array | int | None = None
               ) -> tuple[PyTree, LearnedOptimizerState]:
        """One inner step: returns ``(updates, new_state)``; new params = params + updates.

        ``num_steps``: the run's total number of steps; required with ``progress_centres``
        (ignored otherwise).
        """
        self.check_params(params)
        self.check_num_steps(num_steps)
        if jax.tree.structure(grads) != jax.tree.structure(params):
            raise PermSpecError("grads and params have different tree structures")
        c = self.config
        # A non-finite entry acts as a zero gradient and gets a zero update: through per-tensor
        # statistics and the weight-space layer it would otherwise reach every parameter.
        finite = jax.tree.map(jnp.isfinite, grads)
        grads = jax.tree.map(lambda g, ok: jnp.where(ok, g, 0), grads, finite)
        nom = self.nominal(meta_params)
        decay = nom["decay"]
        alpha = self.step_size(meta_params, state.step, num_steps)
        scale = rules.MOMENTUM_FORMS[c.momentum_form](decay)
        m = jax.tree.map(lambda m, g: decay * m + scale * g.astype(jnp.float32),
                         state.momentum, grads)
        direction, fm = m, ()
        if self.network is not None:
            fm, x = self._state_features(state.feature_momenta, grads, params)
            emb = feats.step_embedding(state.step, c.step_timescales)
            if c.progress_centres:
                progress = feats.progress_embedding(state.step, num_steps, c.progress_centres)
                emb = jnp.concatenate([emb, progress])
            f = self.network.apply({"params": meta_params["net"]}, x, emb, self.net_spec)
            f = jax.tree.map(lambda f: f[..., 0], f)
            f = jax.tree.map(rules.NETWORK_TANGENTS[c.network_tangent], f, params)
            f = jax.tree.map(rules.NETWORK_SCALES[c.network_scale], f, m)
            direction = jax.tree.map(lambda m, f: m + nom["beta"] * f, m, f)
        updates = jax.tree.map(lambda d, p, ok: jnp.where(ok, -alpha * d, 0).astype(
            jnp.result_type(p)), direction, params, finite)
        return updates, LearnedOptimizerState(step=state.step + 1, momentum=m,
                                              feature_momenta=fm)

    def _state_features(self, feature_momenta: PyTree, grads: PyTree, params: PyTree
                        ) -> tuple[PyTree, PyTree]:
        """Updated ``feature_momenta`` and f's per-parameter input channels."""
        c = self.config
        if not c.adam_features:
            fm = feats.update_momenta(feature_momenta, grads, c.momentum_decays)
            return fm, feats.state_features(params, grads, fm, c.clip_features)
        momenta = feats.update_momenta(jax.tree.map(lambda x: x[..., :-1], feature_momenta),
                                       grads, c.momentum_decays)
        v = feats.update_second_moment(jax.tree.map(lambda x: x[..., -1], feature_momenta),
                                       grads)
        x = jax.tree.map(lambda a, b: jnp.concatenate([a, b], -1),
                         feats.state_features(params, grads, momenta, c.clip_features),
                         feats.adam_features(momenta, v))
        fm = jax.tree.map(lambda a, b: jnp.concatenate([a, b[..., None]], -1), momenta, v)
        return fm, x

    def step_size(self, meta_params: dict[str, Any], step: jax.Array,
                  num_steps: jax.Array | int | None = None) -> jax.Array:
        """The nominal step size at ``step``: ``alpha``, times the learned schedule
        ``exp(progress_gain . e(step / num_steps))`` with ``progress_centres``."""
        alpha = jnp.exp(meta_params["log_alpha"])
        if not self.config.progress_centres:
            return alpha
        e = feats.progress_embedding(step, num_steps, self.config.progress_centres)
        return alpha * jnp.exp(jnp.dot(meta_params["progress_gain"], e))

    def check_num_steps(self, num_steps) -> None:
        """Raise ``ValueError`` unless ``num_steps`` suits this optimizer (needed with
        ``progress_centres``, at least 1 when given)."""
        if self.config.progress_centres and num_steps is None:
            raise ValueError(
                f"learned optimizer {self.name!r} uses training progress (progress_centres="
                f"{self.config.progress_centres}): give the run's total number of steps, e.g. "
                "as_optax(meta, num_steps=10_000) or load_optax(path, num_steps=10_000)")
        check_num_steps(num_steps)

    # ------------------------------------------------------------------ optax
    def as_optax(self, meta_params: dict[str, Any], num_steps: int | None = None,
                 perm_spec: PyTree = None) -> optax.GradientTransformationExtraArgs:
        """An optax optimizer with these meta-parameters (:func:`learned_opt.adapters.as_optax`).

        Example::

            tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.as_optax(meta))
            opt_state = tx.init(params)
            updates, opt_state = tx.update(grads, opt_state, params)
        """
        return adapters.as_optax(self, meta_params, num_steps, perm_spec)

    def rekey(self, params: PyTree, perm_spec: PyTree = None) -> PyTree:
        """``params`` in this optimizer's own tree when they differ from it only in names
        (:meth:`learned_opt.weight_space.WeightSpace.rekey`; ``perm_spec``: their spec, default
        inferred). A masked tree is returned as is (:meth:`check_params` explains it)."""
        flat = jax.tree.leaves(params, is_leaf=adapters.is_masked)
        if any(adapters.is_masked(x) for x in flat):
            return params
        return self.weight_space.rekey(
            params, perm_spec, hint=". A learned optimizer bound to one weight space cannot "
            f"train it; the weight-space-agnostic methods {list_agnostic_optimizers()} can")

    def num_meta_params(self, meta_params: dict[str, Any] | None = None) -> int:
        """Number of meta-parameters (alpha, decay and beta included)."""
        if meta_params is None:
            meta_params = jax.eval_shape(self.init, jax.random.key(0))
        return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(meta_params))

"""Learned optimizers behind one inner-loop interface (PAPER_NOTES section 3).

Every method applies the nominal update of Harrison et al. (2022) used by the paper::

    m  <- decay * m + g                          (sum form: alpha = 0.1 is SGDM at lr 0.1)
    W  <- W - alpha * (m + beta * f(features))

with ``alpha``, ``beta`` and ``decay`` meta-learned (stored as ``log_alpha``, ``beta`` and
``logit_decay`` so that every value of the meta-parameters is valid) and ``f`` a network on the
whole weight space whose input is :mod:`learned_opt.features` (19 channels per parameter).
Methods differ only in ``f``:

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
:func:`agnostic_optax` builds the per-structure optimizer on first use.

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
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import features as feats
from learned_opt.deepset import DeepSetLinear
from learned_opt.nfn import NFNLinear
from learned_opt.spec import (
    PermSpecError,
    flatten_with_spec,
    is_spec_leaf,
    label_sizes,
    path_str,
    spec_leaves,
)
from learned_opt.unf import UNFLinear
from learned_opt.universal import UniversalDeepSetLinear, UniversalUNFLinear

PyTree = Any

# method name -> (number of leading per-parameter Dense layers, weight-space layer class).
# ``None`` for the class means no network at all (sgdm). The number of leading per-parameter
# layers is -1 for "all but the last" (the paper's layout, whatever ``num_layers`` is).
_METHODS: dict[str, tuple[int, Callable | None]] = {
    "sgdm": (0, None),
    "deepset": (-1, DeepSetLinear),
    "unf": (-1, UNFLinear),
    "unf_deep": (0, UNFLinear),
    "nfn": (-1, NFNLinear),
    "unf_universal": (-1, UniversalUNFLinear),
    "deepset_universal": (-1, UniversalDeepSetLinear),
}
# Methods whose meta-parameters do not depend on the weight space (no per-leaf parameters).
_AGNOSTIC = ("sgdm", "unf_universal", "deepset_universal")

FIXED_AXES_MODES = ("relax", "channels")
# How the network term is scaled before it joins the nominal momentum (see the config).
NETWORK_SCALES = ("none", "momentum_rms", "normalised")


def list_optimizers() -> list[str]:
    """Names accepted by :func:`learned_optimizer`."""
    return sorted(_METHODS)


def list_agnostic_optimizers() -> list[str]:
    """Methods whose meta-parameters fit every weight space (:func:`agnostic_optax`)."""
    return sorted(_AGNOSTIC)


@dataclasses.dataclass(frozen=True)
class LearnedOptimizerConfig:
    """Options of a learned optimizer (saved with every checkpoint).

    Attributes:
      hidden_features: channels of the hidden layers of f (paper: 32).
      num_layers: layers of f, the last one to 1 channel (paper: 4).
      momentum_decays: decays of the momentum features (averaging form).
      step_timescales: timescales of the step embedding ``tanh(t / s - 1)``.
      init_alpha, init_beta, init_decay: initial nominal step size, network-term scale and
        nominal momentum decay (paper: 0.1, 0.001, 0.9).
      momentum_form: nominal momentum ``"sum"`` (m <- decay m + g, the paper's formula, so the
        initial rule is SGDM at learning rate alpha) or ``"average"`` (m <- decay m +
        (1 - decay) g, public code; the same alpha then acts like a 10x smaller learning rate).
      clip_features: clip the 8 state channels to [-1, 1] before the RMS normalisation.
      fixed_axes: how the network treats spec axes labelled ``None``: ``"relax"`` gives each
        such axis a fresh label of its own (a larger symmetry group than the true one, so the
        network stays equivariant to the true group; the meta-parameter count then depends on no
        size at all); ``"channels"`` keeps them fixed, so the weight-space layer treats their
        positions as extra channels (exact, but the count grows with e.g. 64 pixels or a 256
        vocabulary). ``nfn`` always uses the spec as given: its NP layer handles input and
        output neurons itself.
      network_scale: ``"none"`` (paper): the update is ``alpha * (m + beta * f)``; f sees
        RMS-normalised inputs, so its size is the same whether the gradients are large or
        vanishing, and a rule meta-trained on short runs keeps taking full-size steps long
        after the loss has converged. ``"momentum_rms"``: ``alpha * (m + beta * rms(m) * f)``
        with ``rms(m)`` the root mean square of the nominal momentum over each tensor, so the
        network term shrinks with the gradients exactly like the nominal term and its size
        relative to it is ``beta * |f|``. ``"normalised"``: ``alpha * (m + beta * rms(m) *
        f / rms(f))``, so that the network term's size relative to the nominal term is exactly
        ``|beta|`` on every tensor at every step, whatever f outputs on inputs unlike those of
        meta-training (Celo2 normalises its MLP's output per tensor the same way); f only
        chooses the direction.
      network_tangent: remove from the network's output, per tensor, its component along the
        tensor's weights, ``f - (<f, W> / <W, W>) W``, so that the network term cannot grow or
        shrink the weights (to first order). Without it, rules meta-trained on episodes of at
        most 2,000 steps learnt to inflate the weights (the network term pointed along +W,
        cosine 0.91-0.95; the weight norm grew 60x in 10,000 steps): a quick gain on short runs that
        leaves long runs worse than plain SGDM (README, experiment 1).
      adam_features: give f, for each feature momentum ``m_d``, the channel
        ``m_d / sqrt(v)`` with ``v`` the mean squared gradient (decay 0.999): Adam's direction
        at that momentum's timescale (VeLO and Celo feed such ratios). The paper's features are
        all normalised per tensor, so without these f cannot see how large one parameter's
        gradients are relative to its own history, which is what Adam's preconditioning uses.
        ``v`` is kept as one more trailing channel of ``feature_momenta``.
      progress_centres: training-progress input (VeLO), off when empty. With centres c the
        optimizer needs the run's total number of steps (``as_optax(meta, num_steps=N)``) and
        uses ``e = tanh(10 (t / N - c))`` twice: as extra input channels of f, and as a learned
        schedule of the whole update, ``alpha_t = alpha * exp(progress_gain . e)``
        (``progress_gain`` starts at 0, so the initial rule is unchanged). Meta-trained on
        episodes of several lengths, the rule can then decay its steps in relative time, which
        carries over to runs longer than any it was trained on.
        ``features.PROGRESS_CENTRES`` are VeLO's.
    """

    hidden_features: int = 32
    num_layers: int = 4
    momentum_decays: tuple[float, ...] = feats.MOMENTUM_DECAYS
    step_timescales: tuple[float, ...] = feats.STEP_TIMESCALES
    init_alpha: float = 0.1
    init_beta: float = 0.001
    init_decay: float = 0.9
    momentum_form: str = "sum"
    clip_features: bool = True
    fixed_axes: str = "relax"
    network_scale: str = "none"
    network_tangent: bool = False
    adam_features: bool = False
    progress_centres: tuple[float, ...] = ()

    def __post_init__(self):
        # Lists (e.g. from JSON) become tuples so that the config stays hashable.
        object.__setattr__(self, "momentum_decays", tuple(float(d) for d in self.momentum_decays))
        object.__setattr__(self, "step_timescales", tuple(float(s) for s in self.step_timescales))
        object.__setattr__(self, "progress_centres",
                           tuple(float(c) for c in self.progress_centres))
        if self.hidden_features < 1:
            raise ValueError(f"hidden_features must be >= 1, got {self.hidden_features}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not all(0.0 < d < 1.0 for d in self.momentum_decays):
            raise ValueError(f"momentum_decays must lie in (0, 1), got {self.momentum_decays}")
        if not all(s > 0 for s in self.step_timescales):
            raise ValueError(f"step_timescales must be positive, got {self.step_timescales}")
        if not self.init_alpha > 0:
            raise ValueError(f"init_alpha must be > 0, got {self.init_alpha}")
        if not 0.0 < self.init_decay < 1.0:
            raise ValueError(f"init_decay must lie in (0, 1), got {self.init_decay}")
        if self.momentum_form not in ("sum", "average"):
            raise ValueError(
                f"momentum_form must be 'sum' or 'average', got {self.momentum_form!r}")
        if self.fixed_axes not in FIXED_AXES_MODES:
            raise ValueError(
                f"fixed_axes must be one of {FIXED_AXES_MODES}, got {self.fixed_axes!r}")
        if not all(math.isfinite(c) for c in self.progress_centres):
            raise ValueError(f"progress_centres must be finite, got {self.progress_centres}")
        if self.network_scale not in NETWORK_SCALES:
            raise ValueError(
                f"network_scale must be one of {NETWORK_SCALES}, got {self.network_scale!r}")

    @property
    def num_features(self) -> int:
        return feats.num_features(len(self.momentum_decays), len(self.step_timescales),
                                  len(self.progress_centres), self.adam_features)


class LearnedOptimizerState(NamedTuple):
    """Inner-loop state of a learned optimizer."""

    step: jax.Array  # int32 scalar: number of updates applied so far
    momentum: PyTree  # nominal momentum, like params (float32)
    # like params with a trailing axis of len(momentum_decays) (+1 for v with adam_features);
    # () for sgdm
    feature_momenta: PyTree


def relax_fixed_axes(spec: PyTree) -> PyTree:
    """Give every ``None`` axis of ``spec`` a fresh label of its own.

    A map equivariant to the larger group is equivariant to the true one, so this is safe; it
    makes the update network's parameter count independent of fixed sizes (pixels, vocabulary).
    The fresh labels are strings ``"fixed:<leaf path>:<axis>"``.
    """
    used = {lab for _, labs in spec_leaves(spec) for lab in labs}
    flat, treedef = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)
    out = []
    for path, labs in flat:
        new = []
        for axis, lab in enumerate(labs):
            if lab is None:
                lab = f"fixed:{path_str(path)}:{axis}"
                if lab in used:
                    raise PermSpecError(f"spec already uses the label {lab!r}; rename it")
            new.append(lab)
        out.append(tuple(new))
    return jax.tree_util.tree_unflatten(treedef, out)


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
      signature: ``(path, shape, labels)`` of every leaf at build time.
    """

    name: str
    config: LearnedOptimizerConfig
    perm_spec: PyTree
    net_spec: PyTree
    signature: tuple[tuple[str, tuple[int, ...], tuple], ...]
    network: UpdateNetwork | None

    @property
    def agnostic(self) -> bool:
        """Whether the meta-parameters fit every weight space (see :func:`agnostic_optax`)."""
        return self.name in _AGNOSTIC

    # ------------------------------------------------------------------ checks
    def check_params(self, params: PyTree, what: str = "params") -> None:
        """Raise ``PermSpecError`` naming the first leaf where ``params`` differ in structure.

        Structure means leaf paths, ranks and consistent label sizes; permuted label sizes may
        differ from the ones seen at build. Fixed axes whose size enters the network's
        parameters (``fixed_axes="channels"``, ``nfn``) must keep their size. Leaves must be
        floating point and non-empty (``ValueError`` otherwise).
        """
        flat, _ = jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        got = [(path_str(p), x) for p, x in flat]
        if any(isinstance(x, optax.MaskedNode) for _, x in got):
            masked = next(p for p, x in got if isinstance(x, optax.MaskedNode))
            raise PermSpecError(
                f"learned optimizer {self.name!r} got a masked weight space (leaf {masked} is "
                "masked out): it needs every leaf it was built for, because its update network "
                "couples all tensors. Wrap the other transformations in optax.masked instead.")
        for i, (path, shape, labels) in enumerate(self.signature):
            if i >= len(got):
                raise PermSpecError(f"{what} structure differs from the optimizer's: leaf {path} "
                                    f"(shape {shape}) is missing")
            gpath, x = got[i]
            if gpath != path:
                raise PermSpecError(f"{what} structure differs from the optimizer's at leaf "
                                    f"{i}: expected {path}, got {gpath}")
            gshape = tuple(np.shape(x))
            if len(gshape) != len(shape):
                raise PermSpecError(f"{what} leaf {path}: expected rank {len(shape)} (labels "
                                    f"{labels}), got shape {gshape}")
        if len(got) > len(self.signature):
            raise PermSpecError(f"{what} structure differs from the optimizer's: unexpected "
                                f"extra leaf {got[len(self.signature)][0]}")
        _check_arrays(params, what)
        label_sizes(params, self.net_spec)  # one size per label, with the leaf named otherwise
        if self.network is None:
            return
        for (path, shape, _), (_, x), (_, net_labels) in zip(
                self.signature, got, spec_leaves(self.net_spec), strict=True):
            for axis, lab in enumerate(net_labels):
                if lab is None and np.shape(x)[axis] != shape[axis]:
                    raise PermSpecError(
                        f"{what} leaf {path} axis {axis} is fixed (None) and enters the update "
                        f"network's parameters: expected size {shape[axis]}, got "
                        f"{np.shape(x)[axis]}")

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
            x = jax.tree.unflatten(
                jax.tree.structure(self.net_spec, is_leaf=is_spec_leaf),
                [jnp.zeros(shape + (feats.num_state_channels(len(c.momentum_decays),
                                                             c.adam_features),), jnp.float32)
                 for _, shape, _ in self.signature])
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
        self._check_num_steps(num_steps)
        if jax.tree.structure(grads) != jax.tree.structure(params):
            raise PermSpecError("grads and params have different tree structures")
        c = self.config
        nom = self.nominal(meta_params)
        decay = nom["decay"]
        alpha = self.step_size(meta_params, state.step, num_steps)
        scale = 1.0 if c.momentum_form == "sum" else 1.0 - decay
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
            if c.network_tangent:
                f = jax.tree.map(_tangent, f, params)
            if c.network_scale == "momentum_rms":
                f = jax.tree.map(lambda f, m: f * _rms(m), f, m)
            elif c.network_scale == "normalised":
                f = jax.tree.map(lambda f, m: f * (_rms(m) / jnp.maximum(_rms(f), 1e-30)), f, m)
            direction = jax.tree.map(lambda m, f: m + nom["beta"] * f, m, f)
        updates = jax.tree.map(lambda d, p: (-alpha * d).astype(jnp.result_type(p)),
                               direction, params)
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

    def _check_num_steps(self, num_steps) -> None:
        if self.config.progress_centres and num_steps is None:
            raise ValueError(
                f"learned optimizer {self.name!r} uses training progress (progress_centres="
                f"{self.config.progress_centres}): give the run's total number of steps, e.g. "
                "as_optax(meta, num_steps=10_000) or load_optax(path, num_steps=10_000)")
        if isinstance(num_steps, int | float) and not num_steps >= 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    # ------------------------------------------------------------------ optax
    def as_optax(self, meta_params: dict[str, Any], num_steps: int | None = None,
                 perm_spec: PyTree = None) -> optax.GradientTransformationExtraArgs:
        """An optax optimizer with these meta-parameters; its ``update`` needs ``params``.

        ``num_steps``: the total number of steps of the run, required by optimizers with
        ``progress_centres`` (they schedule their steps over it; steps past it reuse the last
        step's schedule); ignored by the others. ``perm_spec``: the spec of the parameters it
        will get, used only when their names differ from the optimizer's (:meth:`rekey`).

        Example::

            tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.as_optax(meta))
            opt_state = tx.init(params)
            updates, opt_state = tx.update(grads, opt_state, params)
        """
        self._check_num_steps(num_steps)

        def init_fn(params):
            return self.init_state(meta_params, self.rekey(params, perm_spec))

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args
            if params is None:
                raise ValueError(
                    f"learned optimizer {self.name!r} needs the current parameters: call "
                    "tx.update(grads, opt_state, params)")
            out, state = self.update(meta_params, state, self.rekey(updates, perm_spec),
                                     self.rekey(params, perm_spec), num_steps)
            return jax.tree.unflatten(jax.tree.structure(updates), jax.tree.leaves(out)), state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def rekey(self, params: PyTree, perm_spec: PyTree = None) -> PyTree:
        """``params`` in this optimizer's own tree when they differ from it only in names.

        A model written another way (``nn.Sequential``'s ``layers_0`` for ``Dense_0``, another
        module name) has the same weight space when its leaves, in flattening order, have the
        same ranks, the same fixed-axis sizes and the same spec up to renaming the labels.
        ``perm_spec`` is the spec of ``params`` (default: inferred). Raises ``PermSpecError``
        saying what differs otherwise.
        """
        flat = jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
        paths = [path_str(p) for p, _ in flat]
        if paths == [p for p, _, _ in self.signature] or any(
                isinstance(x, optax.MaskedNode) for _, x in flat):
            return params  # check_params explains a masked tree
        mine = [p for p, _, _ in self.signature]
        first = next((k for k, (a, b) in enumerate(zip(paths, mine, strict=False)) if a != b),
                     min(len(paths), len(mine)))
        if len(flat) != len(self.signature):
            expected = mine[first] if first < len(mine) else "no more leaves"
            got = paths[first] if first < len(paths) else "no more leaves"
            raise PermSpecError(
                f"params structure differs from the optimizer's (leaf {first}: expected "
                f"{expected}, got {got}); params have {len(flat)} leaves, the "
                f"optimizer was built for {len(self.signature)}: another architecture. A learned "
                f"optimizer bound to one weight space cannot train it; the weight-space-agnostic "
                f"methods {list_agnostic_optimizers()} can")
        for (path, shape, _), gpath, (_, x) in zip(self.signature, paths, flat, strict=True):
            if len(np.shape(x)) != len(shape):
                raise PermSpecError(
                    f"params leaf {gpath} has rank {len(np.shape(x))} where the optimizer's leaf "
                    f"{path} (same position) has rank {len(shape)}: another architecture")
        if perm_spec is None:
            from learned_opt.infer import infer_perm_spec

            try:
                perm_spec = infer_perm_spec(params)
            except PermSpecError as e:
                raise PermSpecError(
                    f"params are named differently from the optimizer's weight space ({paths[0]} "
                    f"for {mine[0]}, ...) and no spec could be inferred to check that they are the "
                    f"same structure ({e}); pass perm_spec=") from e
        theirs = _canonical_labels([lab for _, lab in spec_leaves(perm_spec)])
        ours = _canonical_labels([lab for _, _, lab in self.signature])
        for k, (a, b) in enumerate(zip(theirs, ours, strict=True)):
            if a != b:
                raise PermSpecError(
                    f"params leaf {paths[k]} has spec pattern {a}, the optimizer's leaf {mine[k]} "
                    f"(same position) has {b} (labels numbered by first appearance): the two "
                    "weight spaces are wired differently")
        return jax.tree.unflatten(jax.tree.structure(self.perm_spec, is_leaf=is_spec_leaf),
                                  [x for _, x in flat])

    def num_meta_params(self, meta_params: dict[str, Any] | None = None) -> int:
        """Number of meta-parameters (alpha, decay and beta included)."""
        if meta_params is None:
            meta_params = jax.eval_shape(self.init, jax.random.key(0))
        return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(meta_params))


def _canonical_labels(labels: list[tuple]) -> list[tuple]:
    """Labels renamed 0, 1, ... in order of first appearance (``None`` kept)."""
    ids: dict = {}
    return [tuple(None if lab is None else ids.setdefault(lab, len(ids)) for lab in labs)
            for labs in labels]


def _rms(x: jax.Array) -> jax.Array:
    """Root mean square over the whole tensor (invariant under permutations of its axes)."""
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _tangent(f: jax.Array, w: jax.Array) -> jax.Array:
    """``f`` minus its projection on ``w`` (whole-tensor inner products: permutation invariant)."""
    w = w.astype(jnp.float32)
    return f - jnp.vdot(f, w) / jnp.maximum(jnp.vdot(w, w), 1e-30) * w


def _check_arrays(params: PyTree, what: str = "params") -> None:
    """Raise ``ValueError`` naming the leaf for a tree the update rule cannot work on."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise ValueError(f"{what} has no array leaves: there is nothing to optimise")
    for path, x in flat:
        dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(
                f"{what} leaf {path_str(path)} has dtype {dtype}: learned optimizers update "
                "floating-point parameters only (an integer leaf would get zero updates); keep "
                "it out of the tree given to the optimizer")
        if 0 in np.shape(x):
            raise ValueError(f"{what} leaf {path_str(path)} has shape {np.shape(x)} (an axis of "
                             "size 0): per-tensor statistics of an empty tensor are undefined")


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
    if name not in _METHODS:
        raise ValueError(f"unknown learned optimizer {name!r}; choose one of {list_optimizers()}")
    fields = {f.name for f in dataclasses.fields(LearnedOptimizerConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for learned_optimizer; valid: "
                         f"{sorted(fields)}")
    cfg = LearnedOptimizerConfig(**config)
    if name in _AGNOSTIC and name != "sgdm" and cfg.fixed_axes != "relax":
        raise ValueError(f"learned optimizer {name!r} is weight-space agnostic: it treats fixed "
                         f"axes as permuted on their own; fixed_axes={cfg.fixed_axes!r} would "
                         "tie its meta-parameters to their sizes (use 'relax')")
    num_pointwise, layer_cls = _METHODS[name]
    _check_arrays(params)  # before inferring a spec, whose errors would be less clear
    if perm_spec is None:
        if layer_cls is None:
            perm_spec = _all_none_spec(params)
        else:
            from learned_opt.infer import infer_perm_spec

            try:
                perm_spec = infer_perm_spec(params)
            except Exception as e:  # any failure to infer: ask for an explicit spec
                raise PermSpecError(
                    f"learned optimizer {name!r} needs a permutation spec and none could be "
                    f"inferred ({type(e).__name__}: {e}); pass perm_spec=...") from e
    paths, arrays, labels = flatten_with_spec(params, perm_spec)
    label_sizes(params, perm_spec)
    signature = tuple((p, tuple(np.shape(x)), lab)
                      for p, x, lab in zip(paths, arrays, labels, strict=True))
    net_spec = perm_spec
    if cfg.fixed_axes == "relax" and name != "nfn":
        net_spec = relax_fixed_axes(perm_spec)
    network = None
    if layer_cls is not None:
        num_pointwise = cfg.num_layers - 1 if num_pointwise < 0 else num_pointwise
        network = UpdateNetwork(layer_cls, cfg.hidden_features, cfg.num_layers, num_pointwise)
    lopt = LearnedOptimizer(name, cfg, perm_spec, net_spec, signature, network)
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


def agnostic_optax(name: str, meta_params: dict[str, Any], perm_spec: PyTree = None,
                   num_steps: int | None = None, **config: Any
                   ) -> optax.GradientTransformationExtraArgs:
    """A weight-space-agnostic learned optimizer as an optax optimizer for ANY weight space.

    Args:
      name: one of :func:`list_agnostic_optimizers`.
      meta_params: its meta-parameters (from any weight space: their shapes do not depend on it).
      perm_spec: the permutation spec of the parameters it will train; ``None``: inferred from
        them by ``learned_opt.infer_perm_spec`` at ``init`` (``PermSpecError`` saying to pass
        one when that fails, e.g. for attention or residual connections).
      num_steps: the run's total number of steps (optimizers with ``progress_centres``).
      **config: the optimizer's :class:`LearnedOptimizerConfig` fields.

    ``init(params)`` builds the optimizer for the structure of ``params`` (once per structure);
    ``update(grads, state, params)`` needs the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, learned_opt
      >>> small = {"d0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> meta = learned_optimizer("unf_universal", small).init(jax.random.key(0))
      >>> big = {"Dense_0": {"kernel": jnp.ones((5, 8)), "bias": jnp.zeros(8)},
      ...        "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
      >>> tx = agnostic_optax("unf_universal", meta)
      >>> state = tx.init(big)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, big), state, big)
      >>> updates["Dense_1"]["kernel"].shape
      (8, 2)
    """
    if name not in _AGNOSTIC:
        raise ValueError(f"{name!r} binds its meta-parameters to one weight space; the "
                         f"weight-space-agnostic methods are {list_agnostic_optimizers()}")
    built: dict = {}

    def lopt_for(params) -> LearnedOptimizer:
        flat, treedef = jax.tree_util.tree_flatten(params)
        key = (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in flat))
        if key not in built:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
            built[key] = learned_optimizer(name, shapes, perm_spec, **config)
        return built[key]

    def init_fn(params):
        return lopt_for(params).init_state(meta_params, params)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"learned optimizer {name!r} needs the current parameters: call "
                             "tx.update(grads, opt_state, params)")
        return lopt_for(params).update(meta_params, state, updates, params, num_steps)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

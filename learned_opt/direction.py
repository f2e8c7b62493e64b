"""Learned-direction optimizers: a scale-free learned rule whose step size lives outside it.

The recipe of Celo2 (Moudgil et al., ICLR 2026), with a weight-space layer as its option:

1. Scale-free inputs. For every parameter, :data:`FEATURES` (gradient, weight, three momenta,
   the second moment, Adam's ratios, Adafactor's factored ratios and factors), each divided by
   its root mean square over the tensor. Multiplying a tensor's weights and gradients by any
   ``c > 0`` changes none of them.
2. A small per-parameter network (``num_hidden`` ReLU layers of ``hidden_features``) and a
   readout: per parameter (``layer="none"``, Celo2-like), the weight-space-agnostic Deep Set
   layer (``"deepset"``) or the weight-space-agnostic UNF layer (``"unf"``,
   :class:`learned_opt.UniversalUNFLinear`), which lets each parameter's direction depend on
   the rest of the weight space, equivariantly. A linear skip from the inputs starts at
   Adam's direction (``m / sqrt(v)``) and the readout at zero, so the untrained rule is Adam
   normalised per tensor.
3. Direction only: the output is divided by its RMS over each tensor (unit RMS per tensor);
   with ``magnitude="adam"`` it is then given the RMS Adam's step would have on that tensor
   (the network chooses the direction, Adam the per-tensor size). With ``reference_fan_in``
   each matrix's step is then multiplied by ``sqrt(reference_fan_in / fan_in)``: the step size
   Adam needs falls with the width (muP), and on held-out models one peak fits more of them.
4. The step size outside: ``optax.scale_by_learning_rate(schedule)`` (and decoupled weight
   decay) after :func:`scale_by_learned_direction`; :func:`default_schedule` is the one the
   rule was meta-trained under (linear warm-up, cosine decay over the run).

A non-finite gradient entry gets a zero update and leaves every statistic, and so every other
entry, as it would have been with a zero gradient there: it cannot spread through the per-tensor
statistics or the weight-space layer.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> params = {"d0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
  ...           "d1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> from learned_opt.direction_optimizer import learned_direction_optimizer
  >>> lopt = learned_direction_optimizer("direction_unf", params)
  >>> meta = lopt.init(jax.random.key(0))
  >>> tx = optax.chain(scale_by_learned_direction(meta, lopt.config, "unf"),
  ...                  optax.scale_by_learning_rate(1e-3))
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  >>> round(float(jnp.sqrt(jnp.mean(updates["d0"]["kernel"] ** 2))), 6)  # lr x unit RMS
  0.001
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.config import check_num_steps
from learned_opt.spec import PermSpecError, is_spec_leaf, label_sizes
from learned_opt.universal import UniversalDeepSetLinear, UniversalUNFLinear
from learned_opt.weight_space import check_arrays, check_not_masked, relax_fixed_axes

PyTree = Any

# Readout after the per-parameter layers: the ablation's three variants.
LAYERS = {"none": None, "deepset": UniversalDeepSetLinear, "unf": UniversalUNFLinear}
# Registered method names (learned_opt.learned_optimizer) -> readout layer.
METHODS = {"direction_elementwise": "none", "direction_deepset": "deepset",
           "direction_unf": "unf"}
# What rank <= 1 leaves (biases, norms' scales) get: the learned direction, or Adam's
# bias-corrected direction (Celo2's recommended variant uses AdamW for them).
VECTOR_RULES = ("learned", "adam")
# Per-tensor size of the step before the schedule: 1 (direction only: the unit-RMS output, as
# Celo2), or the RMS of Adam's bias-corrected ratio m_0 / sqrt(v) over the tensor (the untrained
# rule is then Adam with b2 = second_moment_decay, step for step).
MAGNITUDES = ("unit", "adam")
# Exponent of the fan-in factor (reference_fan_in / fan_in) ** FAN_IN_POWER; 0.5 was chosen
# over 1 (muP's for hidden layers) on the validation models (docs/direction.md).
FAN_IN_POWER = 0.5
# Input channels, in order; every one is RMS-normalised per tensor.
FEATURES = ("g", "p", "m_0", "m_1", "m_2", "v", "m_0/sqrt(v)", "m_1/sqrt(v)", "m_2/sqrt(v)",
            "1/sqrt(v)", "g/sqrt(v)", "g/sqrt(v_factored)", "m_0/sqrt(v_factored)",
            "v_row", "v_col")
SKIP_INIT_FEATURE = "m_0/sqrt(v)"  # the untrained rule's direction: Adam's (b1 0.9)
_REL_EPS = 1e-6  # epsilon relative to the tensor's mean second moment: keeps 1/sqrt(v) finite
_TINY = 1e-30  # and scale-free (an absolute epsilon would not be)


@dataclasses.dataclass(frozen=True)
class DirectionConfig:
    """Options of a learned-direction rule (saved with every checkpoint).

    Attributes:
      layer: readout, one of ``LAYERS``.
      hidden_features, num_hidden: the per-parameter network (Celo2: 2 layers of 8).
      momentum_decays: three averaging-form momenta ``m <- d m + (1 - d) g``.
      second_moment_decay: of ``v``, the mean squared gradient (Celo2: 0.95).
      factored_decay: of Adafactor's row and column means of g^2 (for rank <= 1 leaves: of the
        full mean of g^2, which is also Adam's ``v`` for ``vector_rule="adam"``).
      vector_rule: one of ``VECTOR_RULES``.
      magnitude: one of ``MAGNITUDES``.
      reference_fan_in: ``None``, or the fan-in whose step the schedule gives: a rank >= 2
        leaf's step is multiplied by ``(reference_fan_in / fan_in) ** FAN_IN_POWER``, with
        ``fan_in`` its size over its last axis (the output axis of Flax's Dense and Conv
        kernels). Rank <= 1 leaves are not rescaled.
      learning_rate: peak of :func:`default_schedule` (meta-training and default use).
      warmup_fraction: linear warm-up of :func:`default_schedule`, as a fraction of the run.
      weight_decay: decoupled weight decay of the default chain (``lr * wd * p``).
    """

    layer: str = "unf"
    hidden_features: int = 8
    num_hidden: int = 2
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    second_moment_decay: float = 0.95
    factored_decay: float = 0.999
    vector_rule: str = "learned"
    magnitude: str = "unit"
    reference_fan_in: int | None = None
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "momentum_decays", tuple(float(d) for d in self.momentum_decays))
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {tuple(LAYERS)}, got {self.layer!r}")
        if self.vector_rule not in VECTOR_RULES:
            raise ValueError(f"vector_rule must be one of {VECTOR_RULES}, got "
                             f"{self.vector_rule!r}")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {self.magnitude!r}")
        if self.reference_fan_in is not None and not (
                isinstance(self.reference_fan_in, int | np.integer) and self.reference_fan_in >= 1):
            raise ValueError(f"reference_fan_in must be None or an integer >= 1, got "
                             f"{self.reference_fan_in!r}")
        if len(self.momentum_decays) != 3:
            raise ValueError(f"momentum_decays must hold 3 decays (FEATURES has m_0..m_2), got "
                             f"{self.momentum_decays}")
        decays = (*self.momentum_decays, self.second_moment_decay, self.factored_decay)
        if not all(0.0 < d < 1.0 for d in decays):
            raise ValueError(f"every decay must lie in (0, 1), got {decays}")
        if self.hidden_features < 1 or self.num_hidden < 0:
            raise ValueError(f"hidden_features must be >= 1 and num_hidden >= 0, got "
                             f"{self.hidden_features}, {self.num_hidden}")
        if not (self.learning_rate > 0 and 0 <= self.warmup_fraction < 1
                and self.weight_decay >= 0):
            raise ValueError("learning_rate must be > 0, warmup_fraction in [0, 1) and "
                             "weight_decay >= 0")


class DirectionState(NamedTuple):
    """Inner-loop state of a learned-direction rule (float32 statistics)."""

    step: jax.Array  # int32 scalar: updates applied so far
    momenta: PyTree  # leaf_shape + (3,)
    second_moment: PyTree  # leaf_shape
    row: PyTree  # rank >= 2: mean of g^2 over the last axis; else the full mean of g^2
    col: PyTree  # rank >= 2: mean of g^2 over the second-to-last axis; else shape (0,)


def default_schedule(learning_rate: float, num_steps: int | None,
                     warmup_fraction: float = 0.05) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` over ``warmup_fraction`` of the run, then cosine
    decay to 0 at ``num_steps`` (and 0 after it). ``num_steps=None``: warm-up over 100 steps,
    then constant (for runs of unknown length).

    Example:
      >>> s = default_schedule(1e-3, 1000)
      >>> [round(float(s(t)), 6) for t in (0, 50, 1000)]
      [0.0, 0.001, 0.0]
    """
    if num_steps is None:
        return optax.linear_schedule(0.0, learning_rate, 100)
    warmup = int(warmup_fraction * num_steps)
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(num_steps, 1))


def schedule_value(cfg: DirectionConfig, step: jax.Array, num_steps) -> jax.Array:
    """:func:`default_schedule` at ``step`` for a traced ``num_steps`` (meta-training)."""
    if num_steps is None:
        return default_schedule(cfg.learning_rate, None)(step)
    n = jnp.maximum(jnp.asarray(num_steps, jnp.float32), 1.0)
    t = jnp.asarray(step, jnp.float32)
    warmup = jnp.floor(cfg.warmup_fraction * n)
    rise = cfg.learning_rate * t / jnp.maximum(warmup, 1.0)
    frac = jnp.clip((t - warmup) / jnp.maximum(n - warmup, 1.0), 0.0, 1.0)
    fall = cfg.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < warmup, rise, fall)


def fan_in_factor(shape: tuple[int, ...], reference_fan_in: int | None) -> float:
    """The step multiplier of a leaf of ``shape`` (see ``DirectionConfig.reference_fan_in``).

    Example:
      >>> fan_in_factor((512, 10), 128), fan_in_factor((3, 3, 8, 16), 72), fan_in_factor((7,), 1)
      (0.5, 1.0, 1.0)
    """
    if reference_fan_in is None or len(shape) < 2:
        return 1.0
    fan_in = math.prod(shape[:-1])
    return (reference_fan_in / max(fan_in, 1)) ** FAN_IN_POWER


# ----------------------------------------------------------------------------- statistics
def _rms_normalised(x: jax.Array) -> jax.Array:
    """``x`` divided by its RMS over the tensor."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x)) + _TINY)


def _rsqrt_rel(v: jax.Array) -> jax.Array:
    """``1 / sqrt(v + eps)`` with eps relative to the tensor's mean (scale-free)."""
    return jax.lax.rsqrt(v + _REL_EPS * jnp.mean(v) + _TINY)


def _init_leaf(p) -> tuple:
    shape = tuple(np.shape(p))
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    if len(shape) >= 2:
        return zeros(shape + (3,)), zeros(shape), zeros(shape[:-1]), zeros(shape[:-2] + shape[-1:])
    return zeros(shape + (3,)), zeros(shape), zeros(shape), zeros((0,))


def _update_leaf(cfg: DirectionConfig, g, m, v, row, col) -> tuple:
    """New statistics of one leaf from its (finite, float32) gradient."""
    d = jnp.asarray(cfg.momentum_decays, jnp.float32)
    m = d * m + (1.0 - d) * g[..., None]
    g2 = jnp.square(g)
    v = cfg.second_moment_decay * v + (1.0 - cfg.second_moment_decay) * g2
    f = cfg.factored_decay
    if g.ndim >= 2:
        row = f * row + (1.0 - f) * jnp.mean(g2, axis=-1)
        col = f * col + (1.0 - f) * jnp.mean(g2, axis=-2)
    else:
        row = f * row + (1.0 - f) * g2
    return m, v, row, col


def _features(p, g, m, v, row, col) -> list[jax.Array]:
    """The ``FEATURES`` of one leaf, each RMS-normalised over the tensor: one array of the
    leaf's shape per feature (separate arrays, not one stacked array, so that XLA computes
    features and network in one fused pass over the tensor)."""
    rv = _rsqrt_rel(v)
    if g.ndim >= 2:
        # Adafactor's estimate of v: row x col / mean(row), and its two factors broadcast.
        v_fac = row[..., :, None] * col[..., None, :] / (
            jnp.mean(row, axis=-1, keepdims=True)[..., None] + _TINY)
        row_b = jnp.broadcast_to(row[..., :, None], g.shape)
        col_b = jnp.broadcast_to(col[..., None, :], g.shape)
    else:
        v_fac, row_b, col_b = row, row, row
    rf = _rsqrt_rel(v_fac)
    m0, m1, m2 = m[..., 0], m[..., 1], m[..., 2]
    chans = [g, p, m0, m1, m2, v, m0 * rv, m1 * rv, m2 * rv, rv, g * rv, g * rf, m0 * rf,
             row_b, col_b]
    return [_rms_normalised(c) for c in chans]


def _adam_direction(cfg: DirectionConfig, m, row, step) -> jax.Array:
    """Adam's bias-corrected direction (b1 = momentum_decays[0], b2 = factored_decay)."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    b1, b2 = cfg.momentum_decays[0], cfg.factored_decay
    m_hat = m[..., 0] / (1.0 - b1 ** t)
    v_hat = row / (1.0 - b2 ** t)
    return m_hat / (jnp.sqrt(v_hat) + 1e-8)


def _adam_rms(cfg: DirectionConfig, m, v, step) -> jax.Array:
    """RMS over the tensor of Adam's bias-corrected ratio ``m_0 / sqrt(v)`` (b1 =
    momentum_decays[0], b2 = second_moment_decay; epsilon relative, so scale-free)."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    m_hat = m[..., 0] / (1.0 - cfg.momentum_decays[0] ** t)
    ratio = m_hat * _rsqrt_rel(v / (1.0 - cfg.second_moment_decay ** t))
    return jnp.sqrt(jnp.mean(jnp.square(ratio)))


# ----------------------------------------------------------------------------- network
class ChannelDense(nn.Module):
    """``nn.Dense`` on a list of channel arrays, with its parameters (``kernel [in, out]``,
    ``bias [out]``, same initialisers): output ``j`` is ``bias_j + sum_k kernel_kj x_k``.

    Elementwise sums let XLA fuse features and network into one pass over each tensor; the
    same layer as a ``[N, in] x [in, out]`` matmul on a stacked array costs 10-15x more on a CPU
    (``scripts/bench_optimizers.py``).
    """

    features: int

    @nn.compact
    def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (len(xs), self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return [bias[j] + sum(kernel[k, j] * x for k, x in enumerate(xs))
                for j in range(self.features)]


class DirectionNetwork(nn.Module):
    """Per-parameter layers on ``FEATURES``, then the readout; plus a linear skip.

    Input: per leaf, the list of its ``FEATURES`` arrays (``leaf_shape`` each); output: one
    array ``leaf_shape`` per leaf (before the per-tensor normalisation).
    """

    layer: str
    hidden_features: int
    num_hidden: int

    @nn.compact
    def __call__(self, xs: list[list[jax.Array]], spec: PyTree) -> list[jax.Array]:
        skip_w = self.param("skip", _skip_init, (len(FEATURES),))
        if LAYERS[self.layer] is None:
            # Leaf by leaf on channel lists: features and network fuse into one pass each.
            dense = [ChannelDense(self.hidden_features, name=f"dense_{i}")
                     for i in range(self.num_hidden)]
            readout = ChannelDense(1, name="readout")
            outs = []
            for chans in xs:
                h = chans
                for layer in dense:
                    h = [nn.relu(a) for a in layer(h)]
                outs.append(sum(skip_w[k] * c for k, c in enumerate(chans)) + readout(h)[0])
            return outs
        # Before a weight-space readout: every leaf in one [N, channels] array, so that the
        # per-parameter layers are a few large ops and the readout gets [..., hidden] leaves.
        shapes = [chans[0].shape for chans in xs]
        flat = jnp.concatenate([jnp.stack(chans, axis=-1).reshape(-1, len(chans))
                                for chans in xs])
        h = flat
        for i in range(self.num_hidden):
            h = nn.relu(nn.Dense(self.hidden_features, name=f"dense_{i}")(h))
        ends = np.cumsum([math.prod(s) for s in shapes])[:-1]
        tree = jax.tree.unflatten(jax.tree.structure(spec, is_leaf=is_spec_leaf),
                                  [p.reshape(s + (h.shape[-1],))
                                   for p, s in zip(jnp.split(h, ends), shapes, strict=True)])
        y = LAYERS[self.layer](1, name="readout")(tree, spec)
        skip = jnp.split(flat @ skip_w, ends)
        return [sk.reshape(s) + a[..., 0]
                for sk, s, a in zip(skip, shapes, jax.tree.leaves(y), strict=True)]


def _skip_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[FEATURES.index(SKIP_INIT_FEATURE)].set(1.0)


# ----------------------------------------------------------------------------- the rule
def direction_update(meta_params: PyTree, config: DirectionConfig, state: DirectionState,
                     grads: PyTree, params: PyTree, net_spec: PyTree = None
                     ) -> tuple[PyTree, DirectionState]:
    """One step of the rule: ``(direction, new_state)``, the direction with unit RMS per tensor
    (``magnitude="adam"``: the RMS of Adam's ratio; ``vector_rule="adam"``: Adam's direction on
    rank <= 1 leaves), in the gradients' dtypes.

    ``net_spec``: the (relaxed) permutation spec of ``params``; needed unless
    ``config.layer == "none"``.
    """
    treedef = jax.tree.structure(params)
    gs, ps = treedef.flatten_up_to(grads), jax.tree.leaves(params)
    finite = [jnp.isfinite(g) for g in gs]
    g32 = [jnp.where(ok, g, 0).astype(jnp.float32) for ok, g in zip(finite, gs, strict=True)]
    stats = [_update_leaf(config, g, *s) for g, s in zip(g32, zip(
        *(treedef.flatten_up_to(x) for x in state[1:]), strict=True), strict=True)]
    xs = [_features(p.astype(jnp.float32), g, *s) for p, g, s in zip(ps, g32, stats, strict=True)]
    net = DirectionNetwork(config.layer, config.hidden_features, config.num_hidden)
    raw = net.apply({"params": meta_params["net"]}, xs, net_spec)
    out = []
    for d, ok, g, (m, v, row, _) in zip(raw, finite, gs, stats, strict=True):
        if config.vector_rule == "adam" and g.ndim <= 1:
            d = _adam_direction(config, m, row, state.step)
        else:
            d = d * jax.lax.rsqrt(jnp.mean(jnp.square(d)) + _TINY)
            if config.magnitude == "adam":
                d = d * _adam_rms(config, m, v, state.step)
            d = d * fan_in_factor(g.shape, config.reference_fan_in)
        out.append(jnp.where(ok, d, 0).astype(g.dtype))
    new = DirectionState(state.step + 1,
                         *(treedef.unflatten(list(s)) for s in zip(*stats, strict=True)))
    return treedef.unflatten(out), new


def init_direction_state(params: PyTree) -> DirectionState:
    """Zero statistics for ``params``."""
    treedef = jax.tree.structure(params)
    leaves = [_init_leaf(p) for p in jax.tree.leaves(params)]
    return DirectionState(jnp.zeros((), jnp.int32),
                          *(treedef.unflatten(list(s)) for s in zip(*leaves, strict=True)))


def net_spec_for(layer: str, params: PyTree, perm_spec: PyTree) -> PyTree:
    """The relaxed spec the readout layer needs (``None`` for ``layer="none"``)."""
    if LAYERS[layer] is None:
        return None
    if perm_spec is None:
        from learned_opt.infer import infer_perm_spec

        check_not_masked(params)
        try:
            perm_spec = infer_perm_spec(params)
        except PermSpecError as e:
            raise PermSpecError(f"the learned-direction rule with layer {layer!r} needs a "
                                f"permutation spec and none could be inferred ({e}); pass "
                                "perm_spec=..., or use layer 'none'") from e
    label_sizes(params, perm_spec)
    return relax_fixed_axes(perm_spec)


def scale_by_learned_direction(meta_params: PyTree, config: DirectionConfig | None = None,
                               layer: str | None = None, perm_spec: PyTree = None
                               ) -> optax.GradientTransformationExtraArgs:
    """The learned direction as an optax transformation (unit RMS per tensor; no step size).

    Chain it with ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``
    (:func:`learned_direction` does). ``update`` needs ``params``. ``perm_spec``: the spec of
    the parameters (inferred once per tree structure when ``None``; unused with layer "none").
    """
    config = config or DirectionConfig()
    if layer is not None:
        config = dataclasses.replace(config, layer=layer)
    specs: dict = {}

    def spec_of(params):
        flat, treedef = jax.tree.flatten(params)
        key = (treedef, tuple(np.shape(x) for x in flat))
        if key not in specs:
            specs[key] = net_spec_for(config.layer, params, perm_spec)
        return specs[key]

    def init_fn(params):
        check_arrays(params)
        spec_of(params)
        return init_direction_state(params)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("the learned-direction rule needs the current parameters: call "
                             "tx.update(grads, opt_state, params)")
        return direction_update(meta_params, config, state, updates, params, spec_of(params))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def learned_direction(meta_params: PyTree, config: DirectionConfig | None = None,
                      num_steps: int | None = None, learning_rate: float | optax.Schedule
                      | None = None, weight_decay: float | None = None, perm_spec: PyTree = None
                      ) -> optax.GradientTransformationExtraArgs:
    """The full optimizer: direction, decoupled weight decay, step size (like ``optax.adamw``).

    ``learning_rate``: a number or an optax schedule; default :func:`default_schedule` with the
    config's peak over ``num_steps`` (the schedule the rule was meta-trained under). A number
    replaces the peak of that schedule. ``weight_decay``: default the config's.
    """
    config = config or DirectionConfig()
    check_num_steps(num_steps)
    if learning_rate is None or isinstance(learning_rate, int | float):
        peak = config.learning_rate if learning_rate is None else float(learning_rate)
        learning_rate = default_schedule(peak, num_steps, config.warmup_fraction)
    wd = config.weight_decay if weight_decay is None else weight_decay
    return optax.chain(scale_by_learned_direction(meta_params, config, perm_spec=perm_spec),
                       optax.add_decayed_weights(wd),
                       optax.scale_by_learning_rate(learning_rate))

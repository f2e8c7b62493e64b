"""Weight-space-agnostic equivariant layers: one set of coefficients for every weight space.

``UNFLinear`` has one coefficient matrix per basis map *per leaf pair*, so its parameters are
tied to one layout: another depth, a CNN or a Transformer needs other parameters. The layers
here share each coefficient across all leaf pairs and all weight spaces whose basis maps have
the same *type*, a description that uses no names and no sizes, so the same parameters apply
to every weight space that has a permutation spec.

The maps. From input leaf ``I`` to output leaf ``O``, every *partial matching* ``M`` of O's axes
with I's axes that pairs only axes carrying the same label gives one map: the mean of ``x_I``
over its unmatched axes, with each matched axis written onto its partner in ``O``, broadcast
along O's unmatched axes. These are the basis maps of ``UNFLinear`` whose partition blocks hold
at most one axis of each leaf: all of them when no leaf repeats a label (MLP, CNN and
Transformer specs); only the diagonal maps are left out otherwise (the hidden-to-hidden kernel
of an RNN, labels ``(h, h)``).

The type of a map is ``(O is I, class(O), class(I), {(role(a), role(b)) for (a, b) in M})``
with ``class(leaf) = min(rank, 3)`` and ``role(axis) = min(position from the end, 2)``: 0 for a
leaf's last axis (a Flax layer's output units), 1 for the one before it (its input units), 2 for
earlier axes (kernel windows, attention heads). There are ``len(map_types()) = 204`` types, a
fixed list: every leaf pair of every weight space, of any rank, falls into it.

The layer, for every output leaf ``O``::

    y_O = sum over types t of  mean over the maps m of type t into O of m(x)  @  W_t  +  b_class(O)

Averaging (rather than summing) the maps of one type keeps the scale of every term the same
whatever the depth, the width and the number of leaves. Axes labelled ``None`` are treated as
permuted on their own (a fresh label each): equivariant to a larger group than the spec's, so to
the spec's too.

Example:
  >>> import jax, jax.numpy as jnp
  >>> mlp = {"w0": jnp.ones((4, 3, 2)), "b0": jnp.ones((3, 2)), "w1": jnp.ones((3, 5, 2))}
  >>> mlp_spec = {"w0": (None, "h"), "b0": ("h",), "w1": ("h", None)}
  >>> layer = UniversalUNFLinear(features=8)
  >>> variables = layer.init(jax.random.key(0), mlp, mlp_spec)
  >>> cnn = {"k": jnp.ones((3, 3, 1, 4, 2)), "b": jnp.ones((4, 2))}  # another weight space
  >>> layer.apply(variables, cnn, {"k": (None, None, None, "c"), "b": ("c",)})["k"].shape
  (3, 3, 1, 4, 8)
"""

from __future__ import annotations

import functools
import itertools
import math
import string
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.spec import PermSpecError, channel_leaves, flatten_with_spec
from learned_opt.unf import UNFLinear
from learned_opt.unf_plan import basis_blocks
from learned_opt.weight_space import canonical_labels, relax_fixed_axes

PyTree = Any

MAX_CLASS = 3  # leaves of rank >= 3 share one class
MAX_ROLE = 2  # axes before a leaf's last two share one role
# Init std of W: 1 / sqrt(c_in * INIT_TYPES). About this many types reach a matrix of an MLP
# (11-16 in the tests' weight spaces), so the output starts at about unit scale.
INIT_TYPES = 16

Matching = tuple[tuple[int, int], ...]  # (out axis, in axis) pairs, sorted by out axis


def leaf_class(rank: int) -> int:
    return min(rank, MAX_CLASS)


def axis_role(axis: int, rank: int) -> int:
    return min(rank - 1 - axis, MAX_ROLE)


def map_type(self_pair: bool, out_rank: int, in_rank: int, matching: Matching) -> tuple:
    """The name-free type of the map from a leaf of ``in_rank`` to one of ``out_rank``."""
    roles = sorted({(axis_role(a, out_rank), axis_role(b, in_rank)) for a, b in matching})
    return (self_pair, leaf_class(out_rank), leaf_class(in_rank), tuple(roles))


def _matchings(out_labels: tuple, in_labels: tuple) -> list[Matching]:
    """Every partial matching of out axes with in axes that pairs equal labels only."""
    out = []

    def extend(a: int, used: frozenset, pairs: tuple):
        if a == len(out_labels):
            out.append(pairs)
            return
        extend(a + 1, used, pairs)  # out axis a unmatched
        for b, lab in enumerate(in_labels):
            if b not in used and lab == out_labels[a]:
                extend(a + 1, used | {b}, pairs + ((a, b),))

    extend(0, frozenset(), ())
    return out


@functools.cache
def map_types() -> tuple[tuple, ...]:
    """Every type a map can have, in a fixed order (the rows of the layer's kernel).

    Enumerated from leaves of rank up to 5 with every label coincidence; larger ranks add no
    type (their extra axes all have role 2, and a set of role pairs needs at most three of
    them), so the list covers every weight space.
    """
    types = set()
    for r_out, r_in in itertools.product(range(6), repeat=2):
        # All axes share one label: every partial matching is allowed.
        for m in _matchings((0,) * r_out, (0,) * r_in):
            types.add(map_type(False, r_out, r_in, m))
            if r_out == r_in:
                types.add(map_type(True, r_out, r_in, m))
    return tuple(sorted(types))


@functools.cache
def _type_index() -> dict[tuple, int]:
    return {t: i for i, t in enumerate(map_types())}


# --------------------------------------------------------------------------------------------
# The plan: which reads each output leaf receives, grouped by type. Built once per structure.


class _Term(NamedTuple):
    """One map into an output leaf: read input leaf ``leaf`` keeping ``in_axes`` (in the order of
    the out axes ``out_axes`` they are written to)."""

    leaf: int
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]


class _Group(NamedTuple):
    """All maps of one type into one output leaf that write onto the same out axes."""

    type_id: int
    out_axes: tuple[int, ...]
    terms: tuple[_Term, ...]  # explicit reads (self pairs, multi-axis matchings)
    pooled: tuple[int, ...]  # class sums of fully pooled leaves to add (cross, empty matching)
    label_sums: tuple  # (label, in role, in class) sums of one-axis reads (cross, one axis)
    minus: tuple[_Term, ...]  # the output leaf's own reads, to remove from those sums
    count: int  # number of maps of this type into the output leaf (all groups of the type)


class _Plan(NamedTuple):
    groups: tuple[tuple[_Group, ...], ...]  # per output leaf
    classes: tuple[int, ...]  # per leaf
    pooled_classes: tuple[int, ...]  # classes with a pooled sum
    axis_reads: tuple  # per (label, role, class): tuple of (leaf, axis)


@functools.lru_cache(maxsize=256)
def _build_plan(labels: tuple[tuple[int, ...], ...]) -> _Plan:
    index = _type_index()
    ranks = [len(labs) for labs in labels]
    classes = tuple(leaf_class(r) for r in ranks)
    n_class = {c: classes.count(c) for c in set(classes)}
    # One-axis reads of every leaf, keyed by (label, role, class).
    axis_reads: dict = {}
    for i, labs in enumerate(labels):
        for b, lab in enumerate(labs):
            axis_reads.setdefault((lab, axis_role(b, ranks[i]), classes[i]), []).append((i, b))
    groups = []
    for o, out_labs in enumerate(labels):
        # type id -> out axes -> dict(terms, pooled, label_sums, minus); and counts per type
        acc: dict = {}
        counts: dict = {}

        def slot(t, out_axes):
            return acc.setdefault(t, {}).setdefault(
                out_axes, dict(terms=[], pooled=[], label_sums=[], minus=[]))

        # Self pair: every matching, explicitly.
        for m in _matchings(out_labs, out_labs):
            t = index[map_type(True, ranks[o], ranks[o], m)]
            slot(t, tuple(a for a, _ in m))["terms"].append(
                _Term(o, tuple(b for _, b in m), tuple(a for a, _ in m)))
            counts[t] = counts.get(t, 0) + 1
        # Cross pairs, empty matching: the mean of every other leaf, through class sums.
        for c, n in sorted(n_class.items()):
            others = n - (c == classes[o])
            if others:
                t = index[map_type(False, ranks[o], _rank_of_class(c, ranks, classes), ())]
                slot(t, ())["pooled"].append(c)
                counts[t] = counts.get(t, 0) + others
                if c == classes[o]:
                    slot(t, ())["minus"].append(_Term(o, (), ()))
        # Cross pairs, one matched axis: through (label, role, class) sums.
        for a, lab in enumerate(out_labs):
            for (lab2, role_in, c_in), reads in sorted(axis_reads.items(), key=repr):
                if lab2 != lab:
                    continue
                others = [(i, b) for i, b in reads if i != o]
                if not others:
                    continue
                key = (False, classes[o], c_in, ((axis_role(a, ranks[o]), role_in),))
                t = index[key]
                s = slot(t, (a,))
                s["label_sums"].append((lab, role_in, c_in))
                s["minus"].extend(_Term(o, (b,), (a,)) for i, b in reads if i == o)
                counts[t] = counts.get(t, 0) + len(others)
        # Cross pairs, two or more matched axes: explicitly (leaves sharing several labels).
        for i, in_labs in enumerate(labels):
            if i == o or len(set(out_labs) & set(in_labs)) == 0:
                continue
            for m in _matchings(out_labs, in_labs):
                if len(m) < 2:
                    continue
                t = index[map_type(False, ranks[o], ranks[i], m)]
                slot(t, tuple(a for a, _ in m))["terms"].append(
                    _Term(i, tuple(b for _, b in m), tuple(a for a, _ in m)))
                counts[t] = counts.get(t, 0) + 1
        groups.append(tuple(
            _Group(t, out_axes, tuple(s["terms"]), tuple(s["pooled"]), tuple(s["label_sums"]),
                   tuple(s["minus"]), counts[t])
            for t in sorted(acc) for out_axes, s in sorted(acc[t].items())))
    return _Plan(tuple(groups), classes, tuple(sorted(n_class)),
                 {k: tuple(v) for k, v in axis_reads.items()})


def _rank_of_class(c: int, ranks, classes) -> int:
    """A rank with class ``c`` (the type only depends on the class)."""
    return next(r for r, k in zip(ranks, classes, strict=True) if k == c)


def _read(x: jax.Array, in_axes: tuple[int, ...]) -> jax.Array:
    """Mean of ``x`` (axes..., C) over every axis not in ``in_axes``; kept axes in that order."""
    letters = string.ascii_letters[:x.ndim]
    out = "".join(letters[b] for b in in_axes) + letters[-1]
    denom = math.prod(x.shape[b] for b in range(x.ndim - 1) if b not in in_axes)
    y = jnp.einsum(f"{letters}->{out}", x)
    return y / denom if denom != 1 else y


def _place(z: jax.Array, out_axes: tuple[int, ...], rank: int) -> jax.Array:
    """(sizes of out_axes..., F) -> broadcastable to (leaf axes..., F), out_axes sorted."""
    shape = [1] * rank + [z.shape[-1]]
    for k, a in enumerate(out_axes):
        shape[a] = z.shape[k]
    return z.reshape(shape)


def _prepare(x: PyTree, spec: PyTree):
    _, arrays, labels = channel_leaves(x, spec)
    widths = {np.shape(a)[-1] for a in arrays}
    if len(widths) != 1:
        raise PermSpecError(f"every leaf needs the same number of channels, got {sorted(widths)}")
    return arrays, _build_plan(canonical_labels(labels, fresh_fixed=True))


class UniversalUNFLinear(nn.Module):
    """The weight-space-agnostic UNF layer: one coefficient matrix per map type (module doc).

    Attributes:
      features: output channels of every leaf.

    Call: ``layer.apply(variables, x, spec)``, ``x`` a pytree of arrays ``leaf_shape + (c_in,)``
    (one ``c_in`` for all leaves) and ``spec`` its permutation spec. Parameters: ``kernel``
    ``(len(map_types()), c_in, features)``, normal with std ``1/sqrt(c_in * INIT_TYPES)``, and
    ``bias`` ``(MAX_CLASS + 1, features)`` (one per leaf class), zero: the same shapes for every
    weight space.
    """

    features: int

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> PyTree:
        arrays, plan = _prepare(x, spec)
        c_in = np.shape(arrays[0])[-1]
        kernel = self.param("kernel", nn.initializers.normal(1 / math.sqrt(c_in * INIT_TYPES)),
                            (len(map_types()), c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (MAX_CLASS + 1, self.features))
        outs = _apply(plan, arrays, kernel, bias)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x), outs)


def _apply(plan: _Plan, arrays, kernel, bias) -> list[jax.Array]:
    dtype = jnp.result_type(*arrays, kernel)
    arrays = [jnp.asarray(a, dtype) for a in arrays]
    reads: dict = {}

    def read(term: _Term) -> jax.Array:
        key = (term.leaf, term.in_axes)
        if key not in reads:
            reads[key] = _read(arrays[term.leaf], term.in_axes)
        return reads[key]

    pooled = {c: sum(read(_Term(i, (), ())) for i, k in enumerate(plan.classes) if k == c)
              for c in plan.pooled_classes}
    label_sums = {key: sum(read(_Term(i, (b,), ())) for i, b in rs)
                  for key, rs in plan.axis_reads.items()}
    outs = []
    for o, groups in enumerate(plan.groups):
        rank = arrays[o].ndim - 1
        # Groups writing onto the same out axes share one matmul (their kernels stacked).
        by_axes: dict = {}
        for g in groups:
            total = [read(t) for t in g.terms]
            total += [pooled[c] for c in g.pooled]
            total += [label_sums[k] for k in g.label_sums]
            z = sum(total) - sum((read(t) for t in g.minus), start=jnp.zeros((), dtype))
            by_axes.setdefault(g.out_axes, []).append((z / g.count, g.type_id))
        y = bias[plan.classes[o]]
        for out_axes, items in sorted(by_axes.items(), key=lambda kv: len(kv[0])):
            zs = jnp.concatenate([z for z, _ in items], axis=-1)
            w = kernel[np.array([t for _, t in items])].reshape(-1, kernel.shape[-1])
            y = y + _place(zs @ w, out_axes, rank)
        outs.append(jnp.broadcast_to(y, arrays[o].shape[:-1] + (kernel.shape[-1],)))
    return outs


class UniversalDeepSetLinear(nn.Module):
    """The weight-space-agnostic Deep Set layer: ``y = x @ W_elem + mean(x) @ W_mean + b`` on
    every leaf (mean over all the leaf's axes), with ONE ``W_elem``, ``W_mean`` and ``b`` shared
    by all leaves of all weight spaces (``DeepSetLinear`` has them per leaf).

    Init as ``DeepSetLinear``: both matrices normal with std ``1/sqrt(2 * c_in)``; bias zero.
    """

    features: int

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> PyTree:
        _, arrays, _ = channel_leaves(x, spec)
        c_in = np.shape(arrays[0])[-1]
        init = nn.initializers.normal(1.0 / math.sqrt(2 * c_in))
        w_elem = self.param("elem", init, (c_in, self.features))
        w_mean = self.param("mean", init, (c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        outs = [a @ w_elem + (jnp.mean(a.reshape(-1, c_in), axis=0) @ w_mean + bias)
                for a in arrays]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x), outs)


# --------------------------------------------------------------------------------------------
# The shared layer as a restricted UNFLinear.


# Every None axis given a label of its own (what these layers assume); the older name.
relaxed_spec = relax_fixed_axes


def as_unf_variables(variables: PyTree, x: PyTree, spec: PyTree) -> dict:
    """``UNFLinear`` variables computing the same function as ``UniversalUNFLinear`` with
    ``variables`` on the weight space of ``x``, with ``relax_fixed_axes(spec)`` given to
    UNFLinear.

    Each basis map gets its type's coefficient divided by the number of maps of that type into
    its output leaf; the diagonal maps (blocks with two axes of one leaf) get zero.
    """
    params = variables["params"] if "params" in variables else variables
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    features = kernel.shape[-1]
    rspec = relax_fixed_axes(spec)
    _, arrays, labels = flatten_with_spec(x, rspec)
    plan_u = _build_plan(canonical_labels(labels, fresh_fixed=True))
    counts = [{g.type_id: g.count for g in groups} for groups in plan_u.groups]
    ranks = [np.ndim(a) - 1 for a in arrays]
    shapes = jax.eval_shape(lambda k: UNFLinear(features).init(k, x, rspec), jax.random.key(0)
                            )["params"]  # spec labels are strings: closed over, not traced
    out = {name: np.zeros(s.shape, kernel.dtype) for name, s in shapes.items()
           if name.startswith("kernel")}
    for b in basis_blocks(x, rspec, features):
        matching = _partition_matching(b.partition)
        if matching is None:
            continue  # a diagonal map: not in the universal layer
        t = _type_index()[map_type(b.out_leaf == b.in_leaf, ranks[b.out_leaf], ranks[b.in_leaf],
                                   matching)]
        out[b.kernel][b.rows, b.cols] = kernel[t] / counts[b.out_leaf][t]
    out = {name: jnp.asarray(k) for name, k in out.items()}
    for o in range(len(arrays)):
        out[f"bias_{o}"] = jnp.asarray(bias[leaf_class(ranks[o])])
    return {"params": out}


def _partition_matching(partition) -> Matching | None:
    """The matching of a UNF partition, or None when a block holds two axes of one leaf."""
    pairs = []
    for block in partition:
        outs = [ax for side, ax in block if side == "out"]
        ins = [ax for side, ax in block if side == "in"]
        if len(outs) > 1 or len(ins) > 1:
            return None
        if outs and ins:
            pairs.append((outs[0], ins[0]))
    return tuple(sorted(pairs))

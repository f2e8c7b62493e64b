"""Universal neural functionals (Zhou, Finn, Harrison 2024): equivariant layers on weight spaces.

A weight space is a pytree of arrays; its permutation spec gives one label per axis (``None`` for
an axis that is never permuted). ``UNFLinear`` expresses *every* linear map from the weight
space to itself that commutes with the spec's permutations (section 3 of the paper):

* For each ordered pair (output leaf, input leaf), self-pairs included, every partition of the
  joined permuted axes (output axes + input axes) into blocks whose members share one label gives
  one basis map. Input axes in one block are read along their diagonal; blocks with only input
  axes are reduced by the mean; output axes in one block write onto a diagonal (zero elsewhere);
  blocks with only output axes broadcast.
* Fixed (``None``) axes are not permuted, so any linear map along them is equivariant: their
  positions are folded into the channels. Each basis map has a
  ``(c_in * fixed_in) x (features * fixed_out)`` coefficient matrix; each output leaf has a bias
  that is constant along its permuted axes and free along its fixed axes.

How it is computed (the layer is on the hot path of a learned optimizer). A partition factors
into an *input pattern* (how the input leaf's axes are grouped into diagonals and which groups
are kept vs. mean-reduced), an *output pattern* (how the output leaf's axes are grouped and
which groups receive a kept axis) and a label-preserving matching between kept and receiving
groups. So the layer

1. computes every input pattern of every input leaf once (one ``einsum`` each),
2. concatenates, along channels, all patterns whose kept axes carry the same labels (their
   *signature*), in every label-preserving axis order,
3. mixes channels with ONE matmul per signature, for all output leaves and output patterns
   that receive that signature at once,
4. writes each output pattern onto its diagonals by multiplying with an identity tensor of the
   diagonal's shape only, and sums the patterns with broadcasting (smallest first).

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  >>> spec = {"w": ("i", "h"), "b": ("h",)}
  >>> x = jax.tree.map(lambda p: p[..., None], params)  # one input channel
  >>> layer = UNFLinear(features=8)
  >>> variables = layer.init(jax.random.key(0), x, spec)
  >>> y = layer.apply(variables, x, spec)
  >>> y["w"].shape, y["b"].shape
  ((3, 4, 8), (4, 8))
  >>> num_basis_terms(("i", "h"), ("h",))  # h appears twice: Bell(2) = 2
  2
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.spec import flatten_with_spec, label_sizes
from learned_opt.unf_plan import Group, Leaf, Plan, basis_blocks, kernel_name, leaf_layouts, prepare

PyTree = Any


# --------------------------------------------------------------------------------------------
# Counting.


@functools.cache
def bell(n: int) -> int:
    """Bell number: the number of partitions of a set of ``n`` elements (1, 1, 2, 5, 15, ...)."""
    if n == 0:
        return 1
    return sum(math.comb(n - 1, k) * bell(k) for k in range(n))


def num_basis_terms(out_labels: tuple, in_labels: tuple) -> int:
    """Number of basis maps from a leaf labelled ``in_labels`` to one labelled ``out_labels``.

    The product over labels of Bell(number of axes with that label in both tuples together);
    ``None`` (fixed) axes contribute a factor 1 (their positions act as channels).

    >>> num_basis_terms(("h", "h"), ("h", "h"))
    15
    >>> num_basis_terms(("a", "b"), ("a", "b"))
    4
    """
    counts: dict = {}
    for lab in tuple(out_labels) + tuple(in_labels):
        if lab is not None:
            counts[lab] = counts.get(lab, 0) + 1
    return math.prod(bell(c) for c in counts.values())


# --------------------------------------------------------------------------------------------
# Reading and writing diagonals (the plan is in learned_opt.unf_plan).


def _letters(n: int) -> str:
    return string.ascii_letters[:n]


def _read(x: jax.Array, groups: tuple[Group, ...], kept: tuple[bool, ...]) -> jax.Array:
    """Read diagonals of ``x`` (permuted axes..., C), mean over non-kept groups."""
    axis_letter = [""] * (x.ndim - 1)
    letters = _letters(len(groups) + 1)
    denom = 1
    for g, (_, positions) in enumerate(groups):
        for p in positions:
            axis_letter[p] = letters[g]
        if not kept[g]:
            denom *= x.shape[positions[0]]
    c = letters[-1]
    out = "".join(letters[g] for g in range(len(groups)) if kept[g]) + c
    y = jnp.einsum("".join(axis_letter) + c + "->" + out, x)
    return y / denom if denom != 1 else y


def _write(z: jax.Array, groups, kept, out_shape: tuple[int, ...]) -> jax.Array:
    """Place z (kept groups in canonical order..., C) onto the diagonals of ``out_shape``.

    Returns an array broadcastable to ``out_shape + (C,)``: groups of one axis that receive nothing
    stay size-1 axes (broadcast later); a group of several axes writes onto its diagonal by a
    product with an identity tensor of only that diagonal's shape.
    """
    r = len(out_shape)
    letters = _letters(r + 1)
    c = letters[r]
    z_spec = "".join(
        letters[positions[0]] for (_, positions), k in zip(groups, kept, strict=True) if k
    )
    z_spec += c
    operands, specs = [z], [z_spec]
    present = set(z_spec[:-1])
    for _, positions in groups:
        if len(positions) > 1:
            n = out_shape[positions[0]]
            delta = np.zeros((n,) * len(positions), np.float32)
            delta[(np.arange(n),) * len(positions)] = 1.0
            operands.append(jnp.asarray(delta, z.dtype))
            specs.append("".join(letters[p] for p in positions))
            present.update(letters[p] for p in positions)
    out = "".join(letters[p] for p in range(r) if letters[p] in present) + c
    y = jnp.einsum(",".join(specs) + "->" + out, *operands) if out != z_spec else z
    return y.reshape(tuple(out_shape[p] if letters[p] in present else 1 for p in range(r)) + (-1,))


def _to_internal(x: jax.Array, leaf: Leaf) -> jax.Array:
    """(leaf axes..., c) -> (permuted axes..., fixed axes * c)."""
    order = leaf.perm_axes + leaf.fixed_axes + (x.ndim - 1,)
    x = jnp.transpose(x, order)
    return x.reshape(x.shape[: len(leaf.perm_axes)] + (-1,))


def _from_internal(y: jax.Array, leaf: Leaf, leaf_shape: tuple, features: int) -> jax.Array:
    """(permuted axes..., fixed axes * features) -> (leaf axes..., features)."""
    order = leaf.perm_axes + leaf.fixed_axes
    y = y.reshape(tuple(leaf_shape[a] for a in order) + (features,))
    inverse = tuple(int(i) for i in np.argsort(order)) + (len(order),)
    return jnp.transpose(y, inverse)



# --------------------------------------------------------------------------------------------
# The layer.



class UNFLinear(nn.Module):
    """The universal equivariant linear layer on a weight space (all basis maps, all leaf pairs).

    Attributes:
      features: output channels of every leaf.

    Call: ``layer.apply(variables, x, spec)`` with ``x`` a pytree of arrays shaped
    ``leaf_shape + (c_in,)`` and ``spec`` its permutation spec (a static Python object). Returns
    the same pytree with ``features`` channels.

    Parameters: one kernel per *signature* (the labels of the axes a group of maps carries
    from input to output, in order of first appearance in the spec: ``kernel_pooled`` for maps
    that pool everything, ``kernel_0`` for maps that carry one axis of label 0, ``kernel_0x1``
    ...). Its rows are the input patterns with that signature (of all input leaves), its
    columns the output patterns with that signature (of all output leaves); the block at a
    (row, column) pair is one basis map's ``(c_in * fixed_in) x (features * fixed_out)``
    matrix (``basis_coefficients`` lists them by partition). One bias ``bias_{o}`` of size
    ``fixed_out * features`` per output leaf. Shapes depend on the spec's structure and
    fixed-axis sizes only, so the same variables apply to any sizes of the permuted labels.

    Init: the coefficients of every map into output leaf ``o`` are normal with std
    ``1/sqrt(fan_in_o)``, ``fan_in_o`` = the sum over all maps into ``o`` of ``c_in * fixed_in``
    (= ``c_in * fixed_in * num_maps`` when the inputs have equal widths). Biases start at zero.
    """

    features: int

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> PyTree:
        _, arrays, _, leaves, plan = prepare(x, spec, self.features)
        kernels = {}
        for sig, recv in plan.receivers.items():
            # std 1/sqrt(fan_in of the receiving output leaf), column block by column block.
            col_std = np.concatenate([
                np.full(leaves[o].fixed_size * self.features, 1.0 / math.sqrt(plan.fan_in[o]))
                for o, _ in recv
            ])
            kernels[sig] = self.param(
                kernel_name(sig), _scaled_normal(col_std), (plan.widths[sig], plan.cols[sig])
            )
        biases = [
            self.param(f"bias_{o}", nn.initializers.zeros, (lf.fixed_size * self.features,))
            for o, lf in enumerate(leaves)
        ]
        return _apply(plan, leaves, arrays, kernels, biases, self.features, x)


def _scaled_normal(col_std: np.ndarray):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * jnp.asarray(col_std, dtype)

    return init


def _apply(plan: Plan, leaves, arrays, kernels, biases, features: int, x_tree) -> PyTree:
    dtype = jnp.result_type(*arrays, *kernels.values())
    internal = [
        _to_internal(jnp.asarray(a, dtype), lf) for a, lf in zip(arrays, leaves, strict=True)
    ]
    # 1. Each input pattern of each leaf, once.
    reads = [_read(internal[r.leaf], r.groups, r.kept) for r in plan.reads]
    # 2.-3. One concatenation and one matmul per signature, for every receiving output pattern.
    mixed: dict = {}
    for sig, recv in plan.receivers.items():
        xs = [jnp.transpose(reads[s.read], s.order + (len(sig),)) for s in plan.sources[sig]]
        xcat = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
        z = xcat @ kernels[sig]
        for o, w in recv:
            col = plan.writes[o][w].col
            mixed[(o, w)] = z[..., col : col + leaves[o].fixed_size * features]
    # 4. Write diagonals / broadcast, sum per output leaf (smallest terms first).
    outs = []
    for o, lf in enumerate(leaves):
        perm_shape = internal[o].shape[:-1]
        terms = [
            _write(mixed[(o, w)], wr.groups, wr.kept, perm_shape)
            for w, wr in enumerate(plan.writes[o])
        ]
        terms.sort(key=lambda t: t.size)
        y = terms[0] + biases[o]
        for t in terms[1:]:
            y = y + t
        y = jnp.broadcast_to(y, perm_shape + (y.shape[-1],))
        outs.append(_from_internal(y, lf, np.shape(arrays[o])[:-1], features))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x_tree), outs)


def basis_coefficients(variables: PyTree, x: PyTree, spec: PyTree) -> tuple[dict, list]:
    """The layer's coefficients, one matrix per basis map, keyed canonically.

    Returns ``(coeffs, biases)``: ``coeffs[(out_leaf, in_leaf, partition)]`` is the
    ``(fixed_in * c_in, fixed_out * features)`` matrix of that map (fixed axes flattened in
    their order, channels last), where ``partition`` is a sorted tuple of sorted blocks of
    ``("out" | "in", original axis index)``; ``biases[o]`` is output leaf o's bias.
    Used to check the layer against a plain reference and to count its maps.
    """
    params = variables["params"] if "params" in variables else variables
    _, arrays, labels = flatten_with_spec(x, spec)
    leaves0 = leaf_layouts(labels, [tuple(np.shape(a))[:-1] for a in arrays])
    features = params["bias_0"].shape[0] // leaves0[0].fixed_size
    coeffs = {}
    for b in basis_blocks(x, spec, features):
        key = (b.out_leaf, b.in_leaf, b.partition)
        assert key not in coeffs, key  # every map appears exactly once
        coeffs[key] = params[b.kernel][b.rows, b.cols]
    biases = [params[f"bias_{o}"] for o in range(len(arrays))]
    return coeffs, biases


# --------------------------------------------------------------------------------------------
# Deep models.


class UNF(nn.Module):
    """A deep equivariant network: ``num_layers`` equivariant layers with a pointwise
    nonlinearity between them; the last layer maps to ``out_features`` with no nonlinearity.

    >>> import jax, jax.numpy as jnp
    >>> x = {"w": jnp.ones((3, 4, 2)), "b": jnp.ones((4, 2))}
    >>> spec = {"w": ("i", "h"), "b": ("h",)}
    >>> net = UNF(hidden_features=16, num_layers=3, out_features=1)
    >>> v = net.init(jax.random.key(0), x, spec)
    >>> net.apply(v, x, spec)["w"].shape
    (3, 4, 1)
    """

    hidden_features: int
    num_layers: int
    out_features: int
    layer_cls: Callable[..., nn.Module] = UNFLinear
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> PyTree:
        if self.num_layers < 1:
            raise ValueError(f"UNF needs num_layers >= 1, got {self.num_layers}")
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = self.layer_cls(self.out_features if last else self.hidden_features)(x, spec)
            if not last:
                x = jax.tree.map(self.activation, x)
        return x


def invariant_pool(x: PyTree, spec: PyTree) -> jax.Array:
    """Mean of every leaf over its permuted axes (fixed axes and channels flattened into
    features), concatenated in leaf order: invariant under every permutation of the spec."""
    label_sizes(x, spec, trailing_axes=1)
    _, arrays, labels = flatten_with_spec(x, spec)
    feats = []
    for a, labs in zip(arrays, labels, strict=True):
        perm = tuple(i for i, lab in enumerate(labs) if lab is not None)
        pooled = jnp.mean(a, axis=perm) if perm else a
        feats.append(pooled.reshape(-1))
    return jnp.concatenate(feats)


class InvariantUNF(nn.Module):
    """An invariant network: equivariant layers (each followed by the nonlinearity), then
    ``invariant_pool`` (mean over permuted axes, leaves concatenated), then an MLP head with
    ``head_features`` hidden widths to ``out_features``.

    ``layer_cls=DeepSetLinear`` gives the Deep Set predictor.

    >>> import jax, jax.numpy as jnp
    >>> x = {"w": jnp.ones((3, 4, 1)), "b": jnp.ones((4, 1))}
    >>> spec = {"w": ("i", "h"), "b": ("h",)}
    >>> net = InvariantUNF(8, 2, 1, head_features=(16,))
    >>> net.apply(net.init(jax.random.key(0), x, spec), x, spec).shape
    (1,)
    """

    hidden_features: int
    num_layers: int
    out_features: int
    head_features: Sequence[int] = (512, 512)
    layer_cls: Callable[..., nn.Module] = UNFLinear
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> jax.Array:
        for _ in range(self.num_layers):
            x = self.layer_cls(self.hidden_features)(x, spec)
            x = jax.tree.map(self.activation, x)
        h = invariant_pool(x, spec)
        for width in self.head_features:
            h = self.activation(nn.Dense(width)(h))
        return nn.Dense(self.out_features)(h)

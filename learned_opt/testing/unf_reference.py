"""A plain reference implementation of the UNF layer: one basis map at a time, as in the paper.

For every ordered pair of leaves and every valid partition of their joined permuted axes, it
reads the input leaf along the partition's diagonals (explicit index arrays), takes the mean
over the blocks that hold input axes only, mixes channels with that map's own matrix, and
scatters the result into a zero tensor of the output leaf's full shape, onto the diagonals of
the blocks that hold output axes (broadcasting over output-only blocks). Nothing is shared
between maps. It is deliberately slow; tests use it to check ``learned_opt.UNFLinear`` and
``scripts/bench_unf.py`` uses it as the baseline.

Coefficients come as ``{(out_leaf, in_leaf, partition): matrix}`` with ``partition`` a sorted
tuple of sorted blocks of ``("out" | "in", original axis)`` and ``matrix`` shaped
``(fixed_in * c_in, fixed_out * features)`` (fixed axes flattened in their order, channels last),
the format of ``learned_opt.unf.basis_coefficients``.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.spec import flatten_with_spec


def _all_set_partitions(items: list) -> list[list[list]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for part in _all_set_partitions(rest):
        out.append([[first], *part])
        for k in range(len(part)):
            out.append(part[:k] + [[first, *part[k]]] + part[k + 1 :])
    return out


def basis_partitions(out_labels: tuple, in_labels: tuple) -> list[tuple]:
    """Every partition of the joined permuted axes into blocks whose members share one label."""
    items = [("out", a) for a, lab in enumerate(out_labels) if lab is not None]
    items += [("in", a) for a, lab in enumerate(in_labels) if lab is not None]
    label = {("out", a): lab for a, lab in enumerate(out_labels)}
    label |= {("in", a): lab for a, lab in enumerate(in_labels)}
    valid = []
    for part in _all_set_partitions(items):  # brute force: filter all partitions
        if all(len({label[i] for i in block}) == 1 for block in part):
            valid.append(tuple(sorted(tuple(sorted(block)) for block in part)))
    return sorted(valid)


def _layout(x, labels, xp):
    """(leaf axes..., c) -> (permuted axes..., fixed axes..., c)."""
    perm = [a for a, lab in enumerate(labels) if lab is not None]
    fixed = [a for a, lab in enumerate(labels) if lab is None]
    return xp.transpose(x, perm + fixed + [x.ndim - 1]), perm, fixed


def _scatter_add(y, idx, vals, xp):
    if xp is np:
        np.add.at(y, idx, vals)
        return y
    return y.at[idx].add(vals)


def apply_map(x_in, in_labels, out_shape, out_labels, partition, matrix, features, xp=jnp):
    """One basis map, applied to one input leaf; returns the full output leaf's contribution.

    ``xp`` is the array module: ``jax.numpy`` (the benchmark's baseline) or ``numpy`` (float64,
    no compilation: fast for the tests' tiny weight spaces)."""
    xin, in_perm, _ = _layout(x_in, in_labels, xp)
    out_perm = [a for a, lab in enumerate(out_labels) if lab is not None]
    out_fixed = [a for a, lab in enumerate(out_labels) if lab is None]
    nb = len(partition)
    sizes = []
    for block in partition:
        side, axis = block[0]
        sizes.append((out_shape if side == "out" else x_in.shape)[axis])

    def grid_index(b):  # index variable of block b, as a broadcastable array over the grid
        shape = [1] * nb
        shape[b] = sizes[b]
        return np.arange(sizes[b]).reshape(shape)

    block_of = {item: b for b, block in enumerate(partition) for item in block}
    # Read: every input axis takes its block's index (equal indices = the diagonal).
    idx = tuple(grid_index(block_of[("in", a)]) for a in in_perm)
    vals = xin[idx] if idx else xin.reshape((1,) * nb + xin.shape)  # (grid..., fixed_in..., c)
    # Reduce: mean over blocks made of input axes only.
    in_only = [b for b, block in enumerate(partition) if all(s == "in" for s, _ in block)]
    for b in in_only:
        vals = xp.mean(vals, axis=b, keepdims=True)
    # Mix channels with this map's matrix.
    vals = vals.reshape(vals.shape[:nb] + (-1,)) @ matrix  # (grid..., fixed_out * features)
    vals = vals.reshape(vals.shape[:nb] + tuple(out_shape[a] for a in out_fixed) + (features,))
    vals = xp.squeeze(vals, axis=tuple(in_only)) if in_only else vals
    # Write: scatter onto the diagonals of the output, in a zero tensor of the full shape.
    keep = [b for b in range(nb) if b not in in_only]
    out_layout = tuple(out_shape[a] for a in out_perm + out_fixed) + (features,)
    y = xp.zeros(out_layout, vals.dtype)
    out_idx = []
    for a in out_perm:
        b = block_of[("out", a)]
        shape = [1] * len(keep)
        shape[keep.index(b)] = sizes[b]
        out_idx.append(np.arange(sizes[b]).reshape(shape))
    if out_idx:
        target = np.broadcast_shapes(*(i.shape for i in out_idx))
        vals = xp.broadcast_to(vals, target + vals.shape[len(keep) :])
        y = _scatter_add(y, tuple(out_idx), vals, xp)
    else:
        y = y + vals.reshape(y.shape)
    inverse = list(np.argsort(out_perm + out_fixed)) + [len(out_shape)]
    return xp.transpose(y, inverse)


def reference_apply(coeffs: dict, biases: list, x, spec, features: int, xp=jnp):
    """The UNF layer computed map by map. ``coeffs``/``biases`` as from ``basis_coefficients``.

    With ``xp=numpy`` everything is converted to float64 numpy arrays first."""
    if xp is np:
        coeffs = {k: np.asarray(v, np.float64) for k, v in coeffs.items()}
        biases = [np.asarray(b, np.float64) for b in biases]
        x = jax.tree.map(lambda a: np.asarray(a, np.float64), x)
    _, arrays, labels = flatten_with_spec(x, spec)
    outs = []
    for o, (xo, out_labels) in enumerate(zip(arrays, labels, strict=True)):
        out_shape = xo.shape[:-1]
        fixed = [out_shape[a] for a, lab in enumerate(out_labels) if lab is None]
        bias = biases[o].reshape(tuple(fixed) + (features,))
        y = xp.zeros(out_shape + (features,), arrays[0].dtype)
        # Bias: constant along permuted axes, free along fixed ones.
        perm = [a for a, lab in enumerate(out_labels) if lab is not None]
        fixed_axes = [a for a, lab in enumerate(out_labels) if lab is None]
        b_full = xp.broadcast_to(
            bias, tuple(out_shape[a] for a in perm) + tuple(fixed) + (features,)
        )
        y = y + xp.transpose(b_full, list(np.argsort(perm + fixed_axes)) + [len(out_shape)])
        for i, (xi, in_labels) in enumerate(zip(arrays, labels, strict=True)):
            for part in basis_partitions(out_labels, in_labels):
                mat = coeffs[(o, i, part)]
                y = y + apply_map(xi, in_labels, out_shape, out_labels, part, mat, features, xp)
        outs.append(y)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x), outs)


def init_coefficients(key, x, spec, features: int):
    """Random coefficients in the reference's format (std 1/sqrt(fan-in per output leaf))."""
    _, arrays, labels = flatten_with_spec(x, spec)

    def width(a, labs):
        return math.prod(a.shape[k] for k, lab in enumerate(labs) if lab is None) * a.shape[-1]

    coeffs, biases = {}, []
    for o, (xo, lo_) in enumerate(zip(arrays, labels, strict=True)):
        cols = width(xo, lo_) // xo.shape[-1] * features
        maps = [
            (i, part, width(xi, li))
            for i, (xi, li) in enumerate(zip(arrays, labels, strict=True))
            for part in basis_partitions(lo_, li)
        ]
        fan_in = sum(w for _, _, w in maps)
        for n, (i, part, w) in enumerate(maps):
            k = jax.random.fold_in(jax.random.fold_in(key, o), n)
            coeffs[(o, i, part)] = jax.random.normal(k, (w, cols)) / math.sqrt(fan_in)
        biases.append(jnp.zeros((cols,)))
    return coeffs, biases


def count_maps(spec_labels: list[tuple]) -> int:
    """Total number of basis maps over all ordered pairs (by enumeration)."""
    return sum(
        len(basis_partitions(o, i)) for o, i in itertools.product(spec_labels, spec_labels)
    )


# --------------------------------------------------------------------------------------------
# Example weight spaces (shapes + specs) shared by the tests and the benchmark.


def _zeros(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s), shapes, is_leaf=lambda s: isinstance(s, tuple))


def mlp_space(sizes=(4, 3, 2, 2), fixed_io=True):
    """Dense layers with biases; input/output neurons fixed (None) unless ``fixed_io=False``."""
    n = len(sizes) - 1
    lab = [None if fixed_io and k in (0, n) else f"n{k}" for k in range(n + 1)]
    shapes = {f"d{k}": {"kernel": (sizes[k], sizes[k + 1]), "bias": (sizes[k + 1],)}
              for k in range(n)}
    spec = {f"d{k}": {"kernel": (lab[k], lab[k + 1]), "bias": (lab[k + 1],)} for k in range(n)}
    return _zeros(shapes), spec


def cnn_space(ksize=2, chans=(2, 3, 2), classes=2, spatial_labels=False):
    """Convs (kh, kw, c_in, c_out) with biases, then a dense head. Input channels and classes
    fixed; spatial axes fixed (None) or, with ``spatial_labels``, labels of their own per conv."""
    shapes, spec = {}, {}
    lab = [None] + [f"c{k}" for k in range(1, len(chans))]
    for k in range(len(chans) - 1):
        sp = (f"kh{k}", f"kw{k}") if spatial_labels else (None, None)
        shapes[f"conv{k}"] = {"kernel": (ksize, ksize, chans[k], chans[k + 1]),
                              "bias": (chans[k + 1],)}
        spec[f"conv{k}"] = {"kernel": sp + (lab[k], lab[k + 1]), "bias": (lab[k + 1],)}
    shapes["head"] = {"kernel": (chans[-1], classes), "bias": (classes,)}
    spec["head"] = {"kernel": (lab[-1], None), "bias": (None,)}
    return _zeros(shapes), spec


def rnn_space(vocab=3, emb=2, hidden=3):
    """Character RNN: embedding, input kernel, recurrent (h, h) matrix, bias, initial state,
    output kernel and bias; vocabulary axes fixed."""
    shapes = {"embed": (vocab, emb), "w_in": (emb, hidden), "w_rec": (hidden, hidden),
              "b": (hidden,), "h0": (hidden,), "w_out": (hidden, vocab), "b_out": (vocab,)}
    spec = {"embed": (None, "e"), "w_in": ("e", "h"), "w_rec": ("h", "h"), "b": ("h",),
            "h0": ("h",), "w_out": ("h", None), "b_out": (None,)}
    return _zeros(shapes), spec


def gru_space(inp=2, hidden=3):
    """A GRU cell as in flax.linen.GRUCell: input kernels ir/iz/in (in, h), bias on `in`,
    hidden kernels hr/hz/hn (h, h) with biases; input features fixed."""
    shapes, spec = {}, {}
    for g in ("r", "z", "n"):
        shapes[f"i{g}"] = {"kernel": (inp, hidden)}
        spec[f"i{g}"] = {"kernel": (None, "h")}
        shapes[f"h{g}"] = {"kernel": (hidden, hidden), "bias": (hidden,)}
        spec[f"h{g}"] = {"kernel": ("h", "h"), "bias": ("h",)}
    shapes["in"]["bias"] = (hidden,)
    spec["in"]["bias"] = ("h",)
    return _zeros(shapes), spec


def transformer_block(d=2, heads=2, qk=2, v=2, mlp=3, vocab=None, blocks=1):
    """Pre-LN Transformer blocks on one residual stream label ``d``. Per block: LayerNorm
    scale/bias (d); query/key kernels (d, heads, qk) sharing the head and qk labels; value
    kernel (d, heads, v) and out kernel (heads, v, d) sharing the v label; MLP (d, m), (m,),
    (m, d), (d,) with its own hidden label. With ``vocab``: embedding and unembedding with a
    fixed vocabulary axis, and a final LayerNorm."""
    shapes, spec = {}, {}
    for b in range(blocks):
        H, Q, V, M = f"H{b}", f"q{b}", f"v{b}", f"m{b}"
        shapes[f"block{b}"] = {
            "ln1": {"scale": (d,), "bias": (d,)},
            "query": (d, heads, qk), "key": (d, heads, qk), "value": (d, heads, v),
            "out": (heads, v, d),
            "ln2": {"scale": (d,), "bias": (d,)},
            "mlp1": {"kernel": (d, mlp), "bias": (mlp,)},
            "mlp2": {"kernel": (mlp, d), "bias": (d,)},
        }
        spec[f"block{b}"] = {
            "ln1": {"scale": ("d",), "bias": ("d",)},
            "query": ("d", H, Q), "key": ("d", H, Q), "value": ("d", H, V), "out": (H, V, "d"),
            "ln2": {"scale": ("d",), "bias": ("d",)},
            "mlp1": {"kernel": ("d", M), "bias": (M,)},
            "mlp2": {"kernel": (M, "d"), "bias": ("d",)},
        }
    if vocab is not None:
        shapes["embed"] = (vocab, d)
        spec["embed"] = (None, "d")
        shapes["ln_f"] = {"scale": (d,), "bias": (d,)}
        spec["ln_f"] = {"scale": ("d",), "bias": ("d",)}
        shapes["unembed"] = {"kernel": (d, vocab), "bias": (vocab,)}
        spec["unembed"] = {"kernel": ("d", None), "bias": (None,)}
    return _zeros(shapes), spec


def repeated_label_space(a=2, b=2):
    """A 3-axis tensor with a repeated label (a, b, a), a vector on a and a scalar."""
    shapes = {"t": (a, b, a), "u": (a,), "s": ()}
    spec = {"t": ("a", "b", "a"), "u": ("a",), "s": ()}
    return _zeros(shapes), spec


def scalar_space():
    return {"s": jnp.zeros(())}, {"s": ()}


ZOO = {
    "mlp": mlp_space,
    "cnn_fixed_spatial": cnn_space,
    "cnn_spatial_labels": lambda: cnn_space(spatial_labels=True),
    "rnn": rnn_space,
    "gru": gru_space,
    "transformer": transformer_block,
    "repeated_label": repeated_label_space,
    "scalar": scalar_space,
}

"""How ``UNFLinear`` is laid out: the plan of its reads, kernels and writes (shared preparation).

The plan says which patterns of each input leaf to read, how to group them into one matmul per
*signature*, and where each basis map's coefficient block lives in those kernels (module doc of
:mod:`learned_opt.unf`). It depends only on the spec's structure, its fixed-axis sizes and the
channel counts, and is built once per structure (cached), at trace time. :func:`basis_blocks`
lists every basis map with its block; :mod:`learned_opt.unf` and
:mod:`learned_opt.universal` both read the layer's coefficients through it.

Example:
  >>> import jax.numpy as jnp
  >>> x = {"w": jnp.ones((3, 4, 1)), "b": jnp.ones((4, 1))}
  >>> blocks = basis_blocks(x, {"w": ("i", "h"), "b": ("h",)}, features=8)
  >>> len(blocks), sorted({b.kernel for b in blocks})
  (10, ['kernel_0', 'kernel_0x1', 'kernel_1', 'kernel_pooled'])
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import numpy as np

from learned_opt.spec import channel_leaves
from learned_opt.weight_space import canonical_labels

PyTree = Any

Group = tuple[int, tuple[int, ...]]  # (label id, positions among the leaf's permuted axes)


def set_partitions(items: tuple) -> list[list[tuple]]:
    """All partitions of ``items`` (in a fixed order); blocks keep the items' order."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for part in set_partitions(rest):
        out.append([(first,), *part])
        for k in range(len(part)):
            out.append(part[:k] + [(first, *part[k])] + part[k + 1 :])
    return out


def patterns(labels: tuple[int, ...]) -> list[tuple[tuple[Group, ...], tuple[bool, ...]]]:
    """Every (grouping of a leaf's permuted axes into same-label diagonals, kept flags).

    Groups are sorted by (label id, positions); ``kept[g]`` says whether group g is matched with a
    group of the other leaf (True) or reduced / broadcast on its own (False).
    """
    by_label: dict[int, list[int]] = {}
    for pos, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(pos)
    per_label = [
        [[(lab, block) for block in part] for part in set_partitions(tuple(positions))]
        for lab, positions in sorted(by_label.items())
    ]
    out = []
    for combo in itertools.product(*per_label):
        groups = tuple(sorted(g for part in combo for g in part))
        for kept in itertools.product((False, True), repeat=len(groups)):
            out.append((groups, kept))
    return out


def signature(groups: tuple[Group, ...], kept: tuple[bool, ...]) -> tuple[int, ...]:
    """Labels of the kept groups, in canonical (sorted) order."""
    return tuple(lab for (lab, _), k in zip(groups, kept, strict=True) if k)


def label_preserving_orders(sig: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All permutations of range(len(sig)) that only swap positions carrying the same label."""
    runs: dict[int, list[int]] = {}
    for pos, lab in enumerate(sig):
        runs.setdefault(lab, []).append(pos)
    orders = []
    for choice in itertools.product(*(itertools.permutations(p) for p in runs.values())):
        order = [0] * len(sig)
        for positions, perm in zip(runs.values(), choice, strict=True):
            for dst, src in zip(positions, perm, strict=True):
                order[dst] = src
        orders.append(tuple(order))
    return orders


class Read(NamedTuple):
    leaf: int
    groups: tuple[Group, ...]
    kept: tuple[bool, ...]


class Source(NamedTuple):
    """One block of channels of a signature's concatenated input."""

    read: int  # index into Plan.reads
    order: tuple[int, ...]  # transpose of the read's kept axes into the signature's order
    offset: int  # first channel in the signature's concatenation
    width: int  # channels (c_in * fixed_in of the input leaf)


class Write(NamedTuple):
    groups: tuple[Group, ...]
    kept: tuple[bool, ...]  # here: "receives a kept input group"
    sig: tuple[int, ...]
    col: int  # first column of this pattern's coefficients in its signature's kernel


class Plan(NamedTuple):
    reads: tuple[Read, ...]
    sources: dict  # signature -> tuple[Source, ...] (the rows of its kernel)
    widths: dict  # signature -> total input channels (rows of its kernel)
    receivers: dict  # signature -> tuple[(out leaf, write index), ...] (its kernel's columns)
    cols: dict  # signature -> total output columns
    writes: tuple[tuple[Write, ...], ...]  # per output leaf
    fan_in: tuple[int, ...]  # per output leaf: sum of the input widths of all maps into it


@functools.lru_cache(maxsize=256)
def build_plan(
    labels: tuple[tuple[int, ...], ...], widths: tuple[int, ...], out_widths: tuple[int, ...]
) -> Plan:
    """labels: per leaf, label ids of its permuted axes; widths: per leaf, c_in * fixed_in;
    out_widths: per leaf, features * fixed_out."""
    reads, by_sig = [], {}
    for leaf, labs in enumerate(labels):
        for groups, kept in patterns(labs):
            by_sig.setdefault(signature(groups, kept), []).append(len(reads))
            reads.append(Read(leaf, groups, kept))
    sources, sig_widths = {}, {}
    for sig, read_ids in by_sig.items():
        srcs, offset = [], 0
        for r in read_ids:
            for order in label_preserving_orders(sig):
                width = widths[reads[r].leaf]
                srcs.append(Source(r, order, offset, width))
                offset += width
        sources[sig], sig_widths[sig] = tuple(srcs), offset
    writes, fan_in, receivers, cols = [], [], {}, {}
    for o, labs in enumerate(labels):
        leaf_writes, rows = [], 0
        for groups, kept in patterns(labs):
            sig = signature(groups, kept)
            receivers.setdefault(sig, []).append((o, len(leaf_writes)))
            leaf_writes.append(Write(groups, kept, sig, cols.get(sig, 0)))
            cols[sig] = cols.get(sig, 0) + out_widths[o]
            rows += sig_widths[sig]
        writes.append(tuple(leaf_writes))
        fan_in.append(rows)
    receivers = {sig: tuple(r) for sig, r in receivers.items()}
    return Plan(tuple(reads), sources, sig_widths, receivers, cols, tuple(writes), tuple(fan_in))


class Leaf(NamedTuple):
    """How one leaf's axes are laid out: permuted axes first, then fixed axes folded in channels."""

    perm_axes: tuple[int, ...]
    fixed_axes: tuple[int, ...]
    label_ids: tuple[int, ...]
    fixed_size: int


def leaf_layouts(labels: list[tuple], shapes: list[tuple]) -> list[Leaf]:
    """Each leaf's layout; label ids numbered by first appearance over the whole spec."""
    out = []
    for labs, ids, shape in zip(labels, canonical_labels(labels), shapes, strict=True):
        perm = tuple(a for a, lab in enumerate(labs) if lab is not None)
        fixed = tuple(a for a, lab in enumerate(labs) if lab is None)
        out.append(Leaf(perm, fixed, tuple(ids[a] for a in perm),
                        math.prod(shape[a] for a in fixed)))
    return out


def prepare(x: PyTree, spec: PyTree, features: int):
    """Validate ``x`` (leaves ``leaf_shape + (c_in,)``), lay out its leaves and build (or fetch)
    the plan of ``UNFLinear(features)``: ``(paths, arrays, labels, leaves, plan)``."""
    paths, arrays, labels = channel_leaves(x, spec)
    shapes = [tuple(np.shape(a)) for a in arrays]
    leaves = leaf_layouts(labels, [s[:-1] for s in shapes])
    widths = tuple(lf.fixed_size * s[-1] for lf, s in zip(leaves, shapes, strict=True))
    out_widths = tuple(lf.fixed_size * features for lf in leaves)
    plan = build_plan(tuple(lf.label_ids for lf in leaves), widths, out_widths)
    return paths, arrays, labels, leaves, plan


def canonical_partition(out_leaf: Leaf, in_leaf: Leaf, write: Write, read: Read, order):
    """The basis map as a partition of joined axes: blocks of ('out'|'in', original axis)."""
    blocks = []
    in_kept = [g for g, k in zip(read.groups, read.kept, strict=True) if k]
    out_kept = [g for g, k in zip(write.groups, write.kept, strict=True) if k]
    for (_, out_pos), src in zip(out_kept, order, strict=True):
        block = [("out", out_leaf.perm_axes[p]) for p in out_pos]
        block += [("in", in_leaf.perm_axes[p]) for p in in_kept[src][1]]
        blocks.append(tuple(sorted(block)))
    for (_, pos), k in zip(write.groups, write.kept, strict=True):
        if not k:
            blocks.append(tuple(sorted(("out", out_leaf.perm_axes[p]) for p in pos)))
    for (_, pos), k in zip(read.groups, read.kept, strict=True):
        if not k:
            blocks.append(tuple(sorted(("in", in_leaf.perm_axes[p]) for p in pos)))
    return tuple(sorted(blocks))



def kernel_name(sig: tuple[int, ...]) -> str:
    return "kernel_" + ("x".join(map(str, sig)) if sig else "pooled")


class BasisBlock(NamedTuple):
    """Where one basis map's coefficient matrix sits in ``UNFLinear``'s parameters."""

    kernel: str  # the parameter (``kernel_name`` of its signature)
    rows: slice  # its input channels (``c_in * fixed_in`` of the input leaf)
    cols: slice  # its output channels (``features * fixed_out`` of the output leaf)
    out_leaf: int
    in_leaf: int
    partition: tuple  # blocks of ("out" | "in", original axis), as canonical_partition


def basis_blocks(x: PyTree, spec: PyTree, features: int) -> list[BasisBlock]:
    """Every basis map of ``UNFLinear(features)`` on the weight space of ``x``, with its block."""
    _, _, _, leaves, plan = prepare(x, spec, features)
    out = []
    for sig, recv in plan.receivers.items():
        for o, w in recv:
            wr = plan.writes[o][w]
            cols = slice(wr.col, wr.col + leaves[o].fixed_size * features)
            for s in plan.sources[sig]:
                rd = plan.reads[s.read]
                part = canonical_partition(leaves[o], leaves[rd.leaf], wr, rd, s.order)
                out.append(BasisBlock(kernel_name(sig), slice(s.offset, s.offset + s.width), cols,
                                      o, rd.leaf, part))
    return out

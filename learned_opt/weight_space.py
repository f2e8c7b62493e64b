"""The structure of a weight space, and every relabelling of its spec, in one place.

A :class:`WeightSpace` records what a learned optimizer is built for: each leaf's path, shape and
spec labels, in flattening order. Label *sizes* are free (an optimizer built on a 32-unit MLP
updates a 128-unit MLP), so two trees have the same weight space when their leaves have the same
paths and ranks; two trees that differ only in names have it up to :meth:`WeightSpace.rekey`.

The relabellings:

* :func:`canonical_labels`: labels renamed 0, 1, ... in order of first appearance (the
  name-free pattern of a spec; ``None`` kept, or given fresh ids of its own);
* :func:`relax_fixed_axes`: every ``None`` axis given a label of its own (a larger symmetry
  group than the spec's, so a layer equivariant to it is equivariant to the spec's too).

Example:
  >>> import jax.numpy as jnp
  >>> params = {"d0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  >>> spec = {"d0": {"kernel": (None, "h"), "bias": ("h",)}}
  >>> space = WeightSpace.of(params, spec)
  >>> space.paths, space.shapes
  (('d0/bias', 'd0/kernel'), ((3,), (4, 3)))
  >>> canonical_labels(space.labels), canonical_labels(space.labels, fresh_fixed=True)
  (((0,), (None, 0)), ((0,), (-1, 0)))
  >>> relax_fixed_axes(spec)["d0"]["kernel"]
  ('fixed:d0/kernel:0', 'h')
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.spec import (
    PermSpecError,
    flatten_with_spec,
    is_spec_leaf,
    label_sizes,
    path_str,
    spec_leaves,
)

PyTree = Any


def canonical_labels(labels: Sequence[tuple], fresh_fixed: bool = False
                     ) -> tuple[tuple[int | None, ...], ...]:
    """Labels renamed 0, 1, ... in order of first appearance, per leaf.

    ``None`` axes stay ``None``, or with ``fresh_fixed`` get fresh ids -1, -2, ... (each axis
    permuted on its own). Two specs with the same result are the same up to renaming labels.
    """
    ids: dict[Hashable, int] = {}
    fresh = itertools.count(-1, -1)
    return tuple(tuple((next(fresh) if fresh_fixed else None) if lab is None
                       else ids.setdefault(lab, len(ids)) for lab in labs) for labs in labels)


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


def check_not_masked(params: PyTree) -> None:
    """``PermSpecError`` when ``optax.masked`` / ``optax.multi_transform`` left leaves out of
    ``params`` and a spec must be inferred: a weight-space layer needs the whole weight space
    (the part given is not a network whose spec can be read)."""
    import optax

    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    left_out = [path_str(p) for p, x in flat if isinstance(x, optax.MaskedNode)]
    if left_out:
        raise PermSpecError(
            f"optax.masked / multi_transform gave this learned optimizer part of the weight space "
            f"(left out: {left_out}); its layer relates every tensor to the others, so it cannot "
            "infer a spec for a part. Give it every parameter, or pass perm_spec=... for the "
            "part it gets (a layer='none' / direction_elementwise rule needs no spec)")


def check_arrays(params: PyTree, what: str = "params") -> None:
    """Raise ``ValueError`` naming the leaf for a tree an update rule cannot work on."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise ValueError(f"{what} has no array leaves: there is nothing to optimise")
    for path, x in flat:
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.floating):  # numpy's says no to bfloat16
            raise ValueError(
                f"{what} leaf {path_str(path)} has dtype {dtype}: learned optimizers update "
                "floating-point parameters only (an integer leaf would get zero updates); keep "
                "it out of the tree given to the optimizer")
        if 0 in np.shape(x):
            raise ValueError(f"{what} leaf {path_str(path)} has shape {np.shape(x)} (an axis of "
                             "size 0): per-tensor statistics of an empty tensor are undefined")


@dataclasses.dataclass(frozen=True)
class WeightSpace:
    """Leaf paths, shapes and spec labels of a weight space, in flattening order.

    ``treedef`` is the spec's tree structure (what :meth:`unflatten` builds); it is left out of
    comparisons, so a weight space read back from a checkpoint equals the one saved.
    """

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    labels: tuple[tuple, ...]
    treedef: Any = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, params: PyTree, spec: PyTree) -> WeightSpace:
        """The weight space of ``params`` under ``spec`` (``PermSpecError`` if it does not fit)."""
        paths, arrays, labels = flatten_with_spec(params, spec)
        label_sizes(params, spec)
        return cls(tuple(paths), tuple(tuple(np.shape(x)) for x in arrays), tuple(labels),
                   jax.tree.structure(spec, is_leaf=is_spec_leaf))

    def __len__(self) -> int:
        return len(self.paths)

    def unflatten(self, leaves: Sequence[Any]) -> PyTree:
        """A tree shaped like the spec with these leaves (one per leaf, in order)."""
        return jax.tree.unflatten(self.treedef, list(leaves))

    # ------------------------------------------------------------------ checks
    def check_structure(self, got: list[tuple[str, Any]], what: str = "params") -> None:
        """Raise ``PermSpecError`` at the first leaf of ``got`` (``(path, array)`` pairs) whose
        path or rank differs from this weight space's."""
        for i, (path, shape, labels) in enumerate(zip(self.paths, self.shapes, self.labels,
                                                      strict=True)):
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
        if len(got) > len(self):
            raise PermSpecError(f"{what} structure differs from the optimizer's: unexpected "
                                f"extra leaf {got[len(self)][0]}")

    def check_fixed_sizes(self, got: list[tuple[str, Any]], spec: PyTree,
                          what: str = "params") -> None:
        """Raise ``PermSpecError`` where an axis ``spec`` labels ``None`` changed size (its
        positions enter the network's parameters)."""
        for path, shape, (_, x), (_, labels) in zip(self.paths, self.shapes, got,
                                                    spec_leaves(spec), strict=True):
            for axis, lab in enumerate(labels):
                if lab is None and np.shape(x)[axis] != shape[axis]:
                    raise PermSpecError(
                        f"{what} leaf {path} axis {axis} is fixed (None) and enters the update "
                        f"network's parameters: expected size {shape[axis]}, got "
                        f"{np.shape(x)[axis]}")

    # ------------------------------------------------------------------ renaming
    def rekey(self, params: PyTree, perm_spec: PyTree = None, hint: str = "") -> PyTree:
        """``params`` in this weight space's tree when they differ from it only in names.

        A model written another way (``nn.Sequential``'s ``layers_0`` for ``Dense_0``, another
        module name) has the same weight space when its leaves, in flattening order, have the
        same ranks and the same spec up to renaming the labels (:func:`canonical_labels`).
        ``perm_spec`` is the spec of ``params`` (default: inferred). Raises ``PermSpecError``
        saying what differs otherwise (``hint`` ends the message for another architecture).
        """
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [path_str(p) for p, _ in flat]
        mine = list(self.paths)
        if paths == mine:
            return params
        first = next((k for k, (a, b) in enumerate(zip(paths, mine, strict=False)) if a != b),
                     min(len(paths), len(mine)))
        if len(flat) != len(self):
            expected = mine[first] if first < len(mine) else "no more leaves"
            got = paths[first] if first < len(paths) else "no more leaves"
            raise PermSpecError(
                f"params structure differs from the optimizer's (leaf {first}: expected "
                f"{expected}, got {got}); params have {len(flat)} leaves, the "
                f"optimizer was built for {len(self)}: another architecture{hint}")
        for path, shape, gpath, (_, x) in zip(self.paths, self.shapes, paths, flat, strict=True):
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
        theirs = canonical_labels([lab for _, lab in spec_leaves(perm_spec)])
        ours = canonical_labels(self.labels)
        for k, (a, b) in enumerate(zip(theirs, ours, strict=True)):
            if a != b:
                raise PermSpecError(
                    f"params leaf {paths[k]} has spec pattern {a}, the optimizer's leaf {mine[k]} "
                    f"(same position) has {b} (labels numbered by first appearance): the two "
                    "weight spaces are wired differently")
        return self.unflatten([x for _, x in flat])

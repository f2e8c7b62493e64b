"""Permutation specs: which axes of which parameter tensors are permuted together.

A spec is a pytree with the same structure as the parameters whose leaves are tuples with one
label per array axis. Axes that carry the same label are permuted by the same permutation;
``None`` marks an axis that is never permuted (vocabulary, pixels, kernel offsets...).

Example:
  >>> import jax.numpy as jnp
  >>> params = {"d0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
  ...           "d1": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  >>> spec = {"d0": {"kernel": (None, "h"), "bias": ("h",)},
  ...         "d1": {"kernel": ("h", None), "bias": (None,)}}
  >>> label_sizes(params, spec)
  {'h': 3}
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Label = Hashable | None
PyTree = Any


class PermSpecError(ValueError):
    """A permutation spec does not fit the parameters, or is not a symmetry of the network."""


def is_spec_leaf(x: Any) -> bool:
    """Spec leaves are tuples of labels (tuples are pytree nodes for JAX, so we stop at them)."""
    return isinstance(x, tuple) and not hasattr(x, "_fields")


def path_str(path) -> str:
    """Human-readable leaf path, e.g. ``params/Dense_0/kernel``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts) if parts else "<root>"


def spec_leaves(spec: PyTree) -> list[tuple[str, tuple]]:
    """(path, labels) for every spec leaf, in the parameters' flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)
    return [(path_str(p), tuple(labels)) for p, labels in flat]


def _structure_error(params: PyTree, spec: PyTree) -> PermSpecError:
    param_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    spec_paths = [p for p, _ in spec_leaves(spec)]
    missing = [p for p in param_paths if p not in spec_paths]
    extra = [p for p in spec_paths if p not in param_paths]
    bad_leaves = [
        path_str(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)[0]
        if not is_spec_leaf(leaf)
    ]
    details = []
    if missing:
        details.append(f"parameter leaves without a spec: {missing[:5]}")
    if extra:
        details.append(f"spec leaves without a parameter: {extra[:5]}")
    if bad_leaves:
        details.append(f"spec leaves that are not tuples of labels: {bad_leaves[:5]}")
    if not details:
        details.append("the two trees have different container types or ordering")
    return PermSpecError("spec structure does not match the parameters; " + "; ".join(details))


def flatten_with_spec(params: PyTree, spec: PyTree) -> tuple[list[str], list[Any], list[tuple]]:
    """Flatten params and spec together: (paths, arrays, labels), checking the structure."""
    flat_params, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_spec, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_spec_leaf)
    # Compare by leaf paths so that a dict spec matches FrozenDict parameters.
    if [path_str(p) for p, _ in flat_params] != [path_str(p) for p, _ in flat_spec]:
        raise _structure_error(params, spec)
    paths, arrays, labels = [], [], []
    for (p, x), (_, lab) in zip(flat_params, flat_spec, strict=True):
        if not is_spec_leaf(lab):
            raise PermSpecError(
                f"spec leaf at {path_str(p)} must be a tuple of labels, got {lab!r}"
            )
        paths.append(path_str(p))
        arrays.append(x)
        labels.append(tuple(lab))
    return paths, arrays, labels


def label_sizes(params: PyTree, spec: PyTree, trailing_axes: int = 0) -> dict[Label, int]:
    """Validate ``spec`` against ``params`` and return the size of every label.

    Args:
      params: pytree of arrays (or ``jax.ShapeDtypeStruct``).
      spec: permutation spec with the same structure.
      trailing_axes: number of extra trailing axes each array carries beyond the spec
        (for example 1 for a channel axis).

    Raises:
      PermSpecError: naming the offending leaf, when the structure differs, a tuple's length
        differs from the array's rank, or one label is used for axes of different sizes.
    """
    paths, arrays, labels = flatten_with_spec(params, spec)
    sizes: dict[Label, int] = {}
    first_seen: dict[Label, str] = {}
    for path, x, labs in zip(paths, arrays, labels, strict=True):
        shape = tuple(np.shape(x))
        rank = len(shape) - trailing_axes
        if rank != len(labs):
            raise PermSpecError(
                f"leaf {path}: spec {labs} has {len(labs)} labels but the array has rank {rank} "
                f"(shape {shape[:rank] if rank >= 0 else shape})"
            )
        for axis, lab in enumerate(labs):
            if lab is None:
                continue
            if lab in sizes and sizes[lab] != shape[axis]:
                raise PermSpecError(
                    f"label {lab!r} has two sizes: {sizes[lab]} at {first_seen[lab]} and "
                    f"{shape[axis]} at leaf {path} axis {axis}"
                )
            if lab not in sizes:
                sizes[lab] = shape[axis]
                first_seen[lab] = f"leaf {path} axis {axis}"
    return sizes


def channel_leaves(x: PyTree, spec: PyTree) -> tuple[list[str], list[Any], list[tuple]]:
    """``(paths, arrays, labels)`` of a weight space whose leaves carry one trailing channel
    axis (a weight-space layer's input), validated: ``PermSpecError`` naming the leaf when
    ``spec`` does not fit, or when there are no leaves."""
    label_sizes(x, spec, trailing_axes=1)
    paths, arrays, labels = flatten_with_spec(x, spec)
    if not arrays:
        raise PermSpecError("the weight space has no leaves")
    return paths, arrays, labels


def random_permutations(key: jax.Array, sizes: Mapping[Label, int]) -> dict[Label, jax.Array]:
    """One uniformly random permutation per label (deterministic order of labels)."""
    perms = {}
    for i, lab in enumerate(sorted(sizes, key=repr)):
        perms[lab] = jax.random.permutation(jax.random.fold_in(key, i), sizes[lab])
    return perms


def permute(params: PyTree, spec: PyTree, perms: Mapping[Label, jax.Array]) -> PyTree:
    """Apply label permutations to every leaf along the axes the spec names.

    Leaves may carry extra trailing axes (channels); only the leading ``len(labels)`` axes are
    permuted. Labels missing from ``perms`` are left alone.
    """
    paths, arrays, labels = flatten_with_spec(params, spec)
    out = []
    for x, labs in zip(arrays, labels, strict=True):
        for axis, lab in enumerate(labs):
            if lab is not None and lab in perms:
                x = jnp.take(x, perms[lab], axis=axis)
        out.append(x)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), out)


def permuted_labels(spec: PyTree) -> set:
    """All labels used in a spec (``None`` excluded)."""
    return {lab for _, labs in spec_leaves(spec) for lab in labs if lab is not None}

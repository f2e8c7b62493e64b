"""Numerical check that a permutation spec is a true symmetry of a network.

A spec claims that permuting the parameters along its labelled axes leaves the network's
function unchanged. :func:`check_perm_spec` tests the claim: it permutes every label at random
and compares outputs; when they differ it permutes one label at a time to find the culprit.

Example:
  >>> import jax, jax.numpy as jnp
  >>> def apply(p, x):
  ...     return jax.nn.relu(x @ p["w0"] + p["b0"]) @ p["w1"]
  >>> params = {"w0": jnp.ones((3, 4)), "b0": jnp.zeros(4), "w1": jnp.ones((4, 2))}
  >>> spec = {"w0": (None, "h"), "b0": ("h",), "w1": ("h", None)}
  >>> check_perm_spec(apply, params, spec, jnp.ones((5, 3)))
  {'h': 4}
  >>> bad = {"w0": (None, "h"), "b0": ("h",), "w1": (None, None)}
  >>> check_perm_spec(apply, params, bad, jnp.ones((5, 3)))
  Traceback (most recent call last):
  ...
  learned_opt.spec.PermSpecError: permutation spec is not a symmetry ... label 'h' ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from learned_opt.spec import (
    PermSpecError,
    flatten_with_spec,
    label_sizes,
    permute,
    random_permutations,
)

PyTree = Any


def perturb(params: PyTree, key: jax.Array, noise_scale: float) -> PyTree:
    """Add Gaussian noise of std ``noise_scale * rms(leaf)`` (``noise_scale`` for all-zero
    leaves) to every floating-point leaf, so that symmetric values (zero biases, identity
    matrices, LayerNorm scales of one) cannot hide a wrong spec."""

    def scaled(x):
        rms = jnp.sqrt(jnp.mean(jnp.square(x)))
        return noise_scale * jnp.where(rms > 0, rms, 1.0) * jnp.ones_like(x)

    floats = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in jax.tree.leaves(params)]
    if not all(floats):
        raise PermSpecError("check_perm_spec needs floating-point parameters")
    flat, unravel = ravel_pytree(params)
    stds, _ = ravel_pytree(jax.tree.map(scaled, params))
    # One draw for the whole tree: compiling one random op per leaf is slow.
    return unravel(flat + stds * jax.random.normal(key, flat.shape, flat.dtype))


def _non_identity(perms: dict) -> dict:
    """Replace identity permutations (likely for small labels) by a cyclic shift."""
    out = {}
    for lab, p in perms.items():
        p = np.asarray(p)
        if p.size > 1 and np.array_equal(p, np.arange(p.size)):
            p = np.roll(p, 1)
        out[lab] = jnp.asarray(p)
    return out


def _max_diff(a: PyTree, b: PyTree, rtol: float, atol: float) -> tuple[bool, float]:
    """(all close, largest absolute difference) over every output leaf."""
    ok, worst = True, 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok &= bool(np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))
        diff = np.abs(x - y)
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
    return ok, worst


def _leaves_with(params: PyTree, spec: PyTree, label) -> list[str]:
    paths, _, labels = flatten_with_spec(params, spec)
    return [
        f"{path} axis {axis}"
        for path, labs in zip(paths, labels, strict=True)
        for axis, lab in enumerate(labs)
        if lab == label
    ]


def check_perm_spec(
    apply_fn: Callable[[PyTree, Any], PyTree],
    params: PyTree,
    spec: PyTree,
    inputs: Any,
    *,
    key: jax.Array | None = None,
    num_trials: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    noise_scale: float = 0.1,
) -> dict:
    """Verify numerically that ``spec`` is a symmetry of ``apply_fn``.

    The parameters are first perturbed with noise (``noise_scale``; 0 checks them as given).
    Then, ``num_trials`` times, every label gets a random non-identity permutation and
    ``apply_fn(permute(params, spec, perms), inputs)`` must equal ``apply_fn(params, inputs)``
    within ``rtol``/``atol`` (``np.allclose``, every output leaf).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (any pytree of arrays).
      params: parameter pytree.
      spec: permutation spec (see :mod:`learned_opt.spec`).
      inputs: a batch of inputs (random inputs are fine; use enough examples to exercise the
        network, e.g. 8 or more).
      key: PRNG key for the noise and permutations (default ``jax.random.key(0)``).

    Returns:
      The size of every label (``{label: size}``).

    Raises:
      ValueError: the outputs are not finite (nothing can be checked on them).
      PermSpecError: the spec does not fit the parameters (naming the leaf), or permuting
        changes the outputs; the message names the label(s) whose permutation alone changes
        them and the leaves (and axes) that carry each.
    """
    sizes = label_sizes(params, spec)
    key = jax.random.key(0) if key is None else key
    noise_key, perm_key = jax.random.split(key)
    if noise_scale:
        params = jax.jit(perturb, static_argnums=2)(params, noise_key, noise_scale)
    # Always called with every label (identities for the unpermuted ones): compiled once.
    permuted_apply = jax.jit(lambda p, perms: apply_fn(permute(p, spec, perms), inputs))
    labels = [lab for lab in sorted(sizes, key=repr) if sizes[lab] > 1]
    identity = {lab: jnp.arange(sizes[lab]) for lab in labels}
    reference = permuted_apply(params, identity)
    for path, out in jax.tree_util.tree_flatten_with_path(reference)[0]:
        if not np.all(np.isfinite(np.asarray(out))):
            # NaN == NaN under equal_nan: any spec would pass, so there is nothing to check.
            raise ValueError(
                f"apply_fn's output{jax.tree_util.keystr(path)} is not finite (NaN or inf) at "
                f"the{' perturbed' if noise_scale else ''} parameters: the spec cannot be "
                "checked; use finite inputs and parameters (or a smaller noise_scale)")
    for trial in range(num_trials):
        trial_key = jax.random.fold_in(perm_key, trial)
        perms = random_permutations(trial_key, {lab: sizes[lab] for lab in labels})
        perms = _non_identity(perms)
        ok, diff = _max_diff(permuted_apply(params, perms), reference, rtol, atol)
        if ok:
            continue
        culprits = []
        for lab in labels:
            out = permuted_apply(params, {**identity, lab: perms[lab]})
            ok_one, diff_one = _max_diff(out, reference, rtol, atol)
            if not ok_one:
                culprits.append((lab, diff_one))
        if not culprits:
            raise PermSpecError(
                f"permutation spec is not a symmetry: permuting all labels together changes the "
                f"outputs (max abs diff {diff:.3g}) although each label alone does not; labels "
                f"{labels} interact wrongly (e.g. two labels that should be one)"
            )
        lines = [
            f"label {lab!r} (size {sizes[lab]}): permuting it alone changes the outputs by up "
            f"to {d:.3g}; leaves carrying it: {_leaves_with(params, spec, lab)}"
            for lab, d in culprits
        ]
        raise PermSpecError(
            f"permutation spec is not a symmetry of the network (rtol={rtol}, atol={atol}). "
            + " | ".join(lines)
            + ". Either some of these leaves must not carry the label, or a leaf that is "
            "permuted together with them lacks it."
        )
    return dict(sizes)

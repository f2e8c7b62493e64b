"""End-to-end example of the UNF core on a Flax MLP.

1. build a Flax MLP and its permutation spec (hidden units permuted, pixels and classes fixed),
2. print the number of basis maps for every ordered pair of leaves,
3. build a 3-layer UNF on that weight space and check numerically that permuting the MLP's
   hidden units permutes the UNF's output the same way (and that a wrong spec is caught),
4. apply the same UNF variables to a wider MLP (the sizes of permuted axes are free).

Run: python scripts/unf_example.py   (about 10-30 s on 2 CPU cores, mostly compilation)
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

import learned_opt as lo
from learned_opt.spec import spec_leaves


class MLP(nn.Module):
    hidden: tuple[int, ...]
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


def mlp_spec(num_hidden: int) -> dict:
    """Dense_i's output units carry label "h{i}"; input pixels and classes are fixed (None)."""
    labels = [None] + [f"h{i}" for i in range(num_hidden)] + [None]
    return {"params": {f"Dense_{i}": {"kernel": (labels[i], labels[i + 1]),
                                      "bias": (labels[i + 1],)}
                       for i in range(num_hidden + 1)}}


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    key = jax.random.key(args.seed)

    # 1. The network and its spec.
    mlp = MLP(hidden=(16, 16))
    params = mlp.init(key, jnp.zeros((1, 8)))
    spec = mlp_spec(2)
    print("label sizes:", lo.label_sizes(params, spec))
    print_basis_maps(spec)

    # 3. A UNF on the weight space (input: the weights themselves, one channel).
    x = jax.tree.map(lambda p: p[..., None], params)
    unf = lo.UNF(hidden_features=16, num_layers=3, out_features=1)
    variables = jax.jit(lambda k, x: unf.init(k, x, spec))(jax.random.fold_in(key, 1), x)
    apply = jax.jit(lambda v, x: unf.apply(v, x, spec))
    n_params = sum(v.size for v in jax.tree.leaves(variables))
    print(f"\nUNF(16 channels, 3 layers): {n_params:,} parameters")
    check_equivariance(key, mlp, params, spec, x, lambda x: apply(variables, x))

    # 4. The same variables on a wider MLP.
    wide = MLP(hidden=(48, 40)).init(key, jnp.zeros((1, 8)))
    y_wide = apply(variables, jax.tree.map(lambda p: p[..., None], wide))
    print("same UNF on a 8-48-40-4 MLP: output shapes",
          jax.tree.map(lambda a: a.shape, y_wide)["params"]["Dense_1"])


def print_basis_maps(spec):
    """2. Basis maps per ordered pair (output leaf <- input leaf)."""
    leaves = spec_leaves(spec)
    names = [p.removeprefix("params/") for p, _ in leaves]
    print("\nbasis maps per pair (rows: output leaf, columns: input leaf)")
    print(" " * 16 + "".join(f"{n:>16}" for n in names))
    for name, (_, out_labels) in zip(names, leaves, strict=True):
        counts = [lo.num_basis_terms(out_labels, in_labels) for _, in_labels in leaves]
        print(f"{name:>16}" + "".join(f"{c:>16}" for c in counts))
    print("total:", sum(lo.num_basis_terms(o, i) for _, o in leaves for _, i in leaves))


def check_equivariance(key, mlp, params, spec, x, unf):
    """3. Permuting the MLP's hidden units permutes ``unf(x)`` the same way; permuting the
    fixed input pixels does not."""
    y = unf(x)
    perms = lo.random_permutations(jax.random.fold_in(key, 2), lo.label_sizes(params, spec))
    y_of_permuted = unf(lo.permute(x, spec, perms))
    err = max_abs_diff(y_of_permuted, lo.permute(y, spec, perms))
    print(f"equivariance: max |UNF(P x) - P UNF(x)| = {err:.2e}")
    # The permuted MLP computes the same function (that is what makes the spec correct).
    inputs = jax.random.normal(jax.random.fold_in(key, 3), (5, 8))
    same = max_abs_diff(mlp.apply(params, inputs), mlp.apply(lo.permute(params, spec, perms),
                                                             inputs))
    print(f"permuted MLP, max output change = {same:.2e}")
    # A spec that also permutes the input pixels is wrong for the UNF built on the right one:
    wrong = {"params": {**spec["params"], "Dense_0": {"kernel": ("pix", "h0"), "bias": ("h0",)}}}
    pix = {"pix": jax.random.permutation(jax.random.fold_in(key, 4), 8)}
    err_wrong = max_abs_diff(unf(lo.permute(x, wrong, pix)), lo.permute(y, wrong, pix))
    print(f"permuting the (fixed) input pixels instead: max difference = {err_wrong:.2e} "
          "(not a symmetry of this UNF, as expected)")


if __name__ == "__main__":
    main()

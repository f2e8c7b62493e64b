"""Tests of the UNF core: equivariance, completeness (rank == orbits), agreement with the plain
reference implementation, basis counts, transfer to other label sizes, jit/grad/vmap."""

import itertools
from collections import Counter

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt as lo
from learned_opt.spec import flatten_with_spec, spec_leaves
from learned_opt.testing import unf_reference as ref
from learned_opt.unf import basis_coefficients, bell


def _random_like(key, params, channels):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [jax.random.normal(k, p.shape + (channels,)) for k, p in zip(keys, leaves, strict=True)],
    )


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b), strict=True))


def _jitted(module, spec):
    """(init, apply) for one spec. ``apply`` is jitted (eager mode compiles every small op
    separately); ``init`` draws the variables with numpy at the shapes ``module.init`` gives
    (compiling Flax's init, one threefry per parameter, costs several seconds per spec)."""

    def init(key, x):
        shapes = jax.eval_shape(lambda: module.init(key, x, spec))
        rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
        return jax.tree.map(
            lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0]), jnp.float32),
            shapes,
        )

    return init, jax.jit(lambda v, x: module.apply(v, x, spec))


def _check_equivariant(module, params, spec, channels=2, seed=0, invariant=False):
    x = _random_like(jax.random.key(seed), params, channels)
    init, apply = _jitted(module, spec)
    variables = init(jax.random.key(seed + 1), x)
    y = apply(variables, x)
    sizes = lo.label_sizes(params, spec)
    for t in range(2):
        perms = lo.random_permutations(jax.random.key(seed + 10 + t), sizes)
        if sizes:  # a random permutation may be the identity: make sure one label moves
            lab = sorted(sizes, key=repr)[0]
            if sizes[lab] > 1 and bool(jnp.all(perms[lab] == jnp.arange(sizes[lab]))):
                perms[lab] = jnp.roll(perms[lab], 1)
        y_perm = apply(variables, lo.permute(x, spec, perms))
        expected = y if invariant else lo.permute(y, spec, perms)
        scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(y))
        assert _max_diff(y_perm, expected) <= 1e-5 * max(scale, 1.0)
    return x, variables, y


@pytest.mark.parametrize("name", sorted(ref.ZOO))
def test_unflinear_equivariant(name):
    params, spec = ref.ZOO[name]()
    x, _, y = _check_equivariant(lo.UNFLinear(3), params, spec)
    assert jax.tree.map(jnp.shape, y) == jax.tree.map(lambda a: a.shape[:-1] + (3,), x)


def test_equivariance_check_can_fail():
    # A map that is not equivariant (adds a position-dependent ramp) must be caught.
    import flax.linen as nn

    class Ramp(nn.Module):
        @nn.compact
        def __call__(self, x, spec):
            y = lo.UNFLinear(2)(x, spec)
            return jax.tree.map(lambda a: a + jnp.arange(a.shape[0])[(...,) + (None,) *
                                                                     (a.ndim - 1)], y)

    params, spec = ref.mlp_space()
    with pytest.raises(AssertionError):
        _check_equivariant(Ramp(), params, spec)


@pytest.mark.parametrize("name", ["mlp", "rnn", "transformer", "repeated_label"])
def test_deep_unf_equivariant_and_invariant(name):
    params, spec = ref.ZOO[name]()
    _, _, y = _check_equivariant(lo.UNF(4, 3, 2), params, spec)
    assert all(v.shape[-1] == 2 for v in jax.tree.leaves(y))
    _, _, z = _check_equivariant(lo.InvariantUNF(4, 2, 3, head_features=(8,)), params, spec,
                                 invariant=True)
    assert z.shape == (3,)


def test_unf_last_layer_has_no_nonlinearity():
    params, spec = ref.mlp_space()
    x = _random_like(jax.random.key(0), params, 2)
    init, apply = _jitted(lo.UNF(4, 2, 3), spec)
    y = apply(init(jax.random.key(1), x), x)
    assert min(float(v.min()) for v in jax.tree.leaves(y)) < 0  # relu would clip at 0


# ---------------------------------------------------------------------------------------------
# Completeness: the layer spans exactly the equivariant maps.


def _group_elements(sizes):
    labels = sorted(sizes, key=repr)
    for choice in itertools.product(*(itertools.permutations(range(sizes[k])) for k in labels)):
        yield {lab: jnp.array(p) for lab, p in zip(labels, choice, strict=True)}


def _orbit_count(params, spec):
    """Orbits of the group on (output index, input index) pairs, by brute force."""
    ids = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params),
        list(np.split(np.arange(sum(p.size for p in jax.tree.leaves(params))),
                      np.cumsum([p.size for p in jax.tree.leaves(params)])[:-1])),
    )
    ids = jax.tree.map(lambda i, p: jnp.asarray(i).reshape(p.shape), ids, params)
    n = sum(p.size for p in jax.tree.leaves(params))
    parent = np.arange(n * n)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    pairs = np.arange(n * n)
    for perms in _group_elements(lo.label_sizes(params, spec)):
        # permute() moves the entry at index j to position pi^-1(j); the pair map is the same
        # bijection on both sides, which is all an orbit count needs.
        moved = np.concatenate([np.asarray(v).reshape(-1) for v in
                                jax.tree.leaves(lo.permute(ids, spec, perms))])
        image = moved[pairs // n] * n + moved[pairs % n]
        for a, b in zip(pairs, image, strict=True):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb
    return len({find(a) for a in range(n * n)})


def _span_rank(params, spec):
    """Rank of the set of Jacobians of the layer (channels 1) over random coefficient draws."""
    layer = lo.UNFLinear(1)
    x0 = jax.tree.map(lambda p: p[..., None], params)
    flat0, unravel = jax.flatten_util.ravel_pytree(x0)
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), x0, spec))
    n_coef = sum(v.size for k, v in shapes["params"].items() if "kernel" in k)
    flat_v, unravel_v = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda s: jnp.zeros(s.shape), shapes))

    def jac(key):
        v = unravel_v(jax.random.normal(key, flat_v.shape))
        f = lambda flat: jax.flatten_util.ravel_pytree(layer.apply(v, unravel(flat), spec))[0]
        return jax.jacfwd(f)(flat0).reshape(-1)

    keys = jax.random.split(jax.random.key(1), n_coef + 8)
    mats = np.asarray(jax.jit(jax.vmap(jac))(keys), np.float64)
    s = np.linalg.svd(mats, compute_uv=False)
    rank = int(np.sum(s > 1e-4 * s[0]))
    # A clear gap between the kept and the dropped singular values (not a tolerance artefact).
    if rank < len(s):
        assert s[rank] < 1e-5 * s[0] and s[rank - 1] > 1e-3 * s[0]
    return rank


COMPLETENESS = {
    "hh_small": lambda: ({"r": jnp.zeros((3, 3))}, {"r": ("h", "h")}),  # 3 < 4 axes: 14 orbits
    "mlp_fixed_io": lambda: ref.mlp_space((2, 3, 2)),
    "rnn": lambda: ref.rnn_space(vocab=2, emb=2, hidden=2),
    "repeated_label": lambda: ref.repeated_label_space(2, 2),
    "attention": lambda: (
        {"q": jnp.zeros((2, 2, 2)), "o": jnp.zeros((2, 2, 2)), "s": jnp.zeros((2,))},
        {"q": ("d", "H", "k"), "o": ("H", "k", "d"), "s": ("d",)},
    ),
    "cnn_spatial_labels": lambda: ref.cnn_space(ksize=2, chans=(1, 2), classes=1,
                                                spatial_labels=True),
}


@pytest.mark.parametrize("name", sorted(COMPLETENESS))
def test_completeness_rank_equals_orbits(name):
    params, spec = COMPLETENESS[name]()
    assert _span_rank(params, spec) == _orbit_count(params, spec)


def test_hh_small_is_not_fifteen():
    # With n = 3 < 4 axes two of the 15 maps coincide: both sides must see that.
    params, spec = COMPLETENESS["hh_small"]()
    assert _orbit_count(params, spec) == 14


# ---------------------------------------------------------------------------------------------
# Counts.


def test_bell_numbers():
    assert [bell(n) for n in range(7)] == [1, 1, 2, 5, 15, 52, 203]


def test_num_basis_terms_formula():
    assert lo.num_basis_terms(("h", "h"), ("h", "h")) == 15
    assert lo.num_basis_terms(("a", "b"), ("a", "b")) == 4
    assert lo.num_basis_terms((), ()) == 1
    assert lo.num_basis_terms((None, "h"), ("h", None)) == 2
    assert lo.num_basis_terms(("a", "b", "a"), ("a",)) == bell(3) * bell(1)
    # Against the brute-force enumeration of valid partitions.
    for out, inp in [(("d", "H", "q"), ("H", "q", "d")), (("a", "a", "b"), ("b", "a")),
                     (("x",), ("y",)), ((None, "h"), ("h", "h"))]:
        assert lo.num_basis_terms(out, inp) == len(ref.basis_partitions(out, inp))


@pytest.mark.parametrize("name", ["transformer", "gru", "repeated_label", "cnn_fixed_spatial"])
def test_layer_has_one_matrix_per_basis_map(name):
    params, spec = ref.ZOO[name]()
    x = _random_like(jax.random.key(0), params, 2)
    variables = _jitted(lo.UNFLinear(3), spec)[0](jax.random.key(1), x)
    coeffs, _ = basis_coefficients(variables, x, spec)
    labels = [lab for _, lab in spec_leaves(spec)]
    counts = Counter((o, i) for o, i, _ in coeffs)
    for o, i in itertools.product(range(len(labels)), repeat=2):
        assert counts[(o, i)] == lo.num_basis_terms(labels[o], labels[i])
        parts = sorted(p for oo, ii, p in coeffs if (oo, ii) == (o, i))
        assert parts == ref.basis_partitions(labels[o], labels[i])
    # And the kernels hold nothing else: their sizes add up to the maps' matrices.
    _, arrays, labs = flatten_with_spec(x, spec)
    fixed = [int(np.prod([a.shape[k] for k, lab in enumerate(li) if lab is None]))
             for a, li in zip(arrays, labs, strict=True)]
    total = sum(v.size for k, v in variables["params"].items() if k.startswith("kernel"))
    assert total == sum(fixed[i] * 2 * fixed[o] * 3 for o, i, _ in coeffs)
    assert all(coeffs[k].shape == (fixed[k[1]] * 2, fixed[k[0]] * 3) for k in coeffs)


# ---------------------------------------------------------------------------------------------
# Agreement with the plain reference, transfer to other sizes, transformations.


def _nonzero_biases(variables, key):
    p = dict(variables["params"])
    for k in p:
        if k.startswith("bias"):
            key, sub = jax.random.split(key)
            p[k] = jax.random.normal(sub, p[k].shape)
    return {"params": p}


@pytest.mark.parametrize("name", sorted(ref.ZOO))
def test_agrees_with_reference(name):
    params, spec = ref.ZOO[name]()
    x = _random_like(jax.random.key(0), params, 2)
    init, apply = _jitted(lo.UNFLinear(3), spec)
    variables = _nonzero_biases(init(jax.random.key(1), x), jax.random.key(2))
    coeffs, biases = basis_coefficients(variables, x, spec)
    y_ref = ref.reference_apply(coeffs, biases, x, spec, 3, xp=np)
    assert _max_diff(apply(variables, x), y_ref) < 1e-4


def test_reference_agreement_can_fail():
    params, spec = ref.rnn_space()
    x = _random_like(jax.random.key(0), params, 2)
    init, apply = _jitted(lo.UNFLinear(3), spec)
    variables = init(jax.random.key(1), x)
    coeffs, biases = basis_coefficients(variables, x, spec)
    key = next(k for k in coeffs if len(k[2]) == 1)  # one map (a full diagonal) perturbed
    coeffs[key] = coeffs[key] + 0.1
    assert _max_diff(apply(variables, x), ref.reference_apply(
        coeffs, biases, x, spec, 3, xp=np)) > 1e-3


def test_same_variables_apply_to_other_label_sizes():
    small, spec = ref.transformer_block(d=2, heads=2, qk=2, v=2, mlp=3, vocab=3)
    large, _ = ref.transformer_block(d=5, heads=3, qk=4, v=2, mlp=6, vocab=3)
    init, apply = _jitted(lo.UNFLinear(2), spec)
    x_small = _random_like(jax.random.key(0), small, 2)
    variables = _nonzero_biases(init(jax.random.key(1), x_small), jax.random.key(3))
    x_large = _random_like(jax.random.key(2), large, 2)
    y = apply(variables, x_large)
    coeffs, biases = basis_coefficients(variables, x_large, spec)
    assert _max_diff(y, ref.reference_apply(coeffs, biases, x_large, spec, 2, xp=np)) < 1e-4
    # Fixed-axis sizes are part of the structure: changing the vocabulary must be refused.
    other_vocab, _ = ref.transformer_block(d=2, heads=2, qk=2, v=2, mlp=3, vocab=4)
    with pytest.raises(Exception, match="kernel_|shape"):
        apply(variables, _random_like(jax.random.key(2), other_vocab, 2))


def test_jit_grad_vmap():
    params, spec = ref.gru_space()
    layer = lo.UNFLinear(2)
    x = _random_like(jax.random.key(0), params, 3)
    init, apply = _jitted(layer, spec)
    variables = init(jax.random.key(1), x)
    coeffs, biases = basis_coefficients(variables, x, spec)
    assert _max_diff(apply(variables, x), ref.reference_apply(coeffs, biases, x, spec, 2, xp=np)
                     ) < 1e-4
    # vmap over a batch of weight spaces == one at a time.
    xb = jax.tree.map(lambda a: jnp.stack([a, 2 * a + 1, -a]), x)
    yb = jax.jit(jax.vmap(lambda xx: layer.apply(variables, xx, spec)))(xb)
    for k in range(3):
        yk = apply(variables, jax.tree.map(lambda a: a[k], xb))
        assert _max_diff(yk, jax.tree.map(lambda a: a[k], yb)) < 1e-5
    # Gradients w.r.t. both the coefficients and the input weight space are finite and nonzero.
    loss = lambda v, x: sum(jnp.sum(y ** 2) for y in jax.tree.leaves(layer.apply(v, x, spec)))
    gv, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
    for g in jax.tree.leaves((gv, gx)):
        assert bool(jnp.all(jnp.isfinite(g)))
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(gv))

"""Tests of the baseline weight-space layers: DeepSetLinear and NFNLinear."""

import jax
import numpy as np
import pytest
import unf_reference as ref
from test_unf import _check_equivariant, _jitted, _random_like

import learned_opt as lo

# ---------------------------------------------------------------------------------------------
# DeepSetLinear


@pytest.mark.parametrize("name", sorted(ref.ZOO))
def test_deepset_equivariant(name):
    params, spec = ref.ZOO[name]()
    _check_equivariant(lo.DeepSetLinear(3), params, spec)


def test_deepset_matches_formula():
    params, spec = ref.mlp_space()
    x = _random_like(jax.random.key(0), params, 2)
    init, apply = _jitted(lo.DeepSetLinear(3), spec)
    v = init(jax.random.key(1), x)
    y = apply(v, x)
    p = v["params"]
    for o, (a, b) in enumerate(zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        mean = a.reshape(-1, 2).mean(0)
        expected = a @ np.asarray(p[f"elem_{o}"]) + mean @ np.asarray(p[f"mean_{o}"]) + np.asarray(
            p[f"bias_{o}"])
        np.testing.assert_allclose(b, expected, rtol=1e-4, atol=1e-5)


def test_invariant_deepset_is_invariant():
    params, spec = ref.gru_space()
    net = lo.InvariantUNF(4, 2, 1, head_features=(8,), layer_cls=lo.DeepSetLinear)
    _check_equivariant(net, params, spec, invariant=True)

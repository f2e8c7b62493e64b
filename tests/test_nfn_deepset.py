"""Tests of the baseline weight-space layers: DeepSetLinear and NFNLinear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unf import _check_equivariant, _jitted, _random_like

import learned_opt as lo
from learned_opt.nfn import nfn_spec
from learned_opt.testing import unf_reference as ref

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


# ---------------------------------------------------------------------------------------------
# NFNLinear


@pytest.mark.parametrize("name", ["mlp", "cnn_fixed_spatial"])
def test_nfn_equivariant(name):
    params, spec = ref.ZOO[name]()
    _check_equivariant(lo.NFNLinear(3), params, spec)
    # NP also permutes the input and output neurons: equivariant under the NP spec itself.
    _check_equivariant(lo.NFNLinear(3), params, nfn_spec(params, spec, trailing_axes=0))
    _check_equivariant(lo.NFNLinear(2, io_fixed=True), params, spec)


def test_nfn_is_not_equivariant_to_kernel_offsets():
    # Offsets act as channels: permuting them must change the output beyond a permutation
    # (checked through a spec whose offsets carry labels, which NFNLinear refuses).
    params, spec = ref.cnn_space(spatial_labels=True)
    with pytest.raises(lo.PermSpecError, match="conv0/kernel.*spatial"):
        nfn_spec(params, spec, trailing_axes=0)


@pytest.mark.parametrize("name,leaf", [("rnn", "b_out"), ("gru", "h[rzn]/kernel"),
                                       ("transformer", "block0/key"),
                                       ("repeated_label", "leaf s has rank 0"),
                                       ("scalar", "leaf s has rank 0")])
def test_nfn_rejects_other_weight_spaces(name, leaf):
    params, spec = ref.ZOO[name]()
    x = jax.tree.map(lambda p: p[..., None], params)
    with pytest.raises(lo.PermSpecError, match=leaf):
        lo.NFNLinear(2).init(jax.random.key(0), x, spec)


def test_nfn_spec_follows_the_chain_not_the_leaf_order():
    # Layers named so that their alphabetical order is not the chain's order.
    params = {"z_first": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
              "a_second": {"kernel": jnp.zeros((4, 2))}}
    spec = {"z_first": {"kernel": (None, "h"), "bias": ("h",)}, "a_second": {"kernel": ("h", None)}}
    np_spec = nfn_spec(params, spec, trailing_axes=0)
    assert np_spec["z_first"]["kernel"] == (("nfn", 0), ("nfn", 1))
    assert np_spec["a_second"]["kernel"] == (("nfn", 1), ("nfn", 2))
    branched = {**spec, "a_second": {"kernel": ("g", None)}}
    with pytest.raises(lo.PermSpecError, match="chain"):
        nfn_spec(params, branched, trailing_axes=0)


def test_nfn_counts_and_size_independence():
    # The paper's CNN task (3x3 convs 3->16->32, linear 32->10), optimizer network's last layer
    # 32 -> 1 channel: NP maps with offsets as channels, plus one bias per output leaf entry.
    shapes = {"Conv_0": {"kernel": (3, 3, 3, 16), "bias": (16,)},
              "Conv_1": {"kernel": (3, 3, 16, 32), "bias": (32,)},
              "Dense_0": {"kernel": (32, 10), "bias": (10,)}}
    spec = {"Conv_0": {"kernel": (None, None, None, "c0"), "bias": ("c0",)},
            "Conv_1": {"kernel": (None, None, "c0", "c1"), "bias": ("c1",)},
            "Dense_0": {"kernel": ("c1", None), "bias": (None,)}}
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    x = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s + (32,), jnp.float32), shapes,
                     is_leaf=is_shape)
    v = jax.eval_shape(lambda x: lo.NFNLinear(1).init(jax.random.key(0), x, spec), x)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
    # Paper: NFN optimizer network 41,603 = 2,752 (three per-parameter layers) + 3 nominal +
    # 38,848; ours adds 22 output biases (9 + 1 + 9 + 1 + 1 + 1 entries).
    assert n == 41_603 - 2_752 - 3 + 22
    # Independent of neuron counts: the same variables apply to a wider, deeper-input CNN.
    wide = {"Conv_0": {"kernel": (3, 3, 5, 7), "bias": (7,)},
            "Conv_1": {"kernel": (3, 3, 7, 6), "bias": (6,)},
            "Dense_0": {"kernel": (6, 4), "bias": (4,)}}
    xw = jax.tree.map(lambda s: jnp.ones(s + (32,)), wide, is_leaf=is_shape)
    vw = jax.eval_shape(lambda x: lo.NFNLinear(1).init(jax.random.key(0), x, spec), xw)
    assert jax.tree.map(lambda a: a.shape, vw) == jax.tree.map(lambda a: a.shape, v)

"""One test per PermSpecError case of issue 2 (through ``learned_opt.label_sizes``), and the same
errors surfacing, with the leaf named, from the weight-space layers."""

import jax
import jax.numpy as jnp
import pytest

import learned_opt as lo

PARAMS = {
    "d0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
    "d1": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
}
SPEC = {
    "d0": {"kernel": (None, "h"), "bias": ("h",)},
    "d1": {"kernel": ("h", None), "bias": (None,)},
}


def test_valid_spec_gives_sizes():
    assert lo.label_sizes(PARAMS, SPEC) == {"h": 3}


def test_structure_mismatch_names_the_leaf():
    spec = {"d0": SPEC["d0"], "d1": {"kernel": ("h", None)}}  # d1/bias missing
    with pytest.raises(lo.PermSpecError, match="d1/bias"):
        lo.label_sizes(PARAMS, spec)
    spec = {**SPEC, "d2": {"kernel": ("h", None)}}  # extra leaf
    with pytest.raises(lo.PermSpecError, match="d2/kernel"):
        lo.label_sizes(PARAMS, spec)


def test_rank_mismatch_names_the_leaf():
    spec = {"d0": {"kernel": ("h",), "bias": ("h",)}, "d1": SPEC["d1"]}
    with pytest.raises(lo.PermSpecError, match="d0/kernel.*rank 2"):
        lo.label_sizes(PARAMS, spec)


def test_label_with_two_sizes_names_the_leaf():
    spec = {"d0": {"kernel": ("h", "h"), "bias": ("h",)}, "d1": SPEC["d1"]}  # 4 vs 3
    with pytest.raises(lo.PermSpecError, match="'h' has two sizes.*d0/kernel"):
        lo.label_sizes(PARAMS, spec)


def test_perm_spec_error_is_a_value_error():
    assert issubclass(lo.PermSpecError, ValueError)


@pytest.mark.parametrize("layer", [lo.UNFLinear(2), lo.DeepSetLinear(2)])
def test_layers_raise_perm_spec_error(layer):
    x = jax.tree.map(lambda p: p[..., None], PARAMS)
    bad = {"d0": {"kernel": ("h", "h"), "bias": ("h",)}, "d1": SPEC["d1"]}
    with pytest.raises(lo.PermSpecError, match="d0/kernel"):
        layer.init(jax.random.key(0), x, bad)
    # Forgetting the channel axis is a rank error on the first leaf.
    with pytest.raises(lo.PermSpecError, match="rank"):
        layer.init(jax.random.key(0), PARAMS, SPEC)

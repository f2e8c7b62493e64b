"""check_perm_spec and infer_perm_spec on the paper's tasks and on small Flax models."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import tasks
from learned_opt import check_perm_spec, infer_perm_spec
from learned_opt.spec import PermSpecError, spec_leaves

DATA_DIR = os.environ.get("LOPT_DATA_DIR", "/work/shared/data")
# Every registered task has a tiny variant for tests (checked in test_tasks.py).
TINY = [name for name in tasks.list_tasks() if name.endswith("_tiny")]


def setup(name, **kw):
    task = tasks.get_task(name, data_dir=DATA_DIR, **kw)
    params = task.init(jax.random.key(0))
    return task, params, task.sample_batch(jax.random.key(1))["inputs"]


def relabel(spec, fn):
    """Apply fn(path, labels) -> labels to every spec leaf."""
    paths = dict(spec_leaves(spec))

    def walk(node, prefix):
        return {
            k: walk(v, f"{prefix}{k}/") if isinstance(v, dict) else fn(prefix + k, v)
            for k, v in node.items()
        }

    assert paths
    return walk(spec, "")


@pytest.mark.parametrize("name", TINY)
def test_task_specs_are_true_symmetries(name):
    task, params, inputs = setup(name)
    sizes = check_perm_spec(task.apply, params, task.perm_spec, inputs)
    assert sizes and all(n > 1 for n in sizes.values())


def test_swapped_hidden_labels_fail_and_name_the_label():
    task, params, inputs = setup("mlp_fmnist_tiny", hidden_sizes=(8, 8))
    check_perm_spec(task.apply, params, task.perm_spec, inputs)
    bad = relabel(
        task.perm_spec,
        lambda path, labs: ("Dense_1", "Dense_0") if path == "Dense_1/kernel" else labs,
    )
    with pytest.raises(PermSpecError, match=r"label 'Dense_\d'.*Dense_1/kernel axis"):
        check_perm_spec(task.apply, params, bad, inputs)
    # The paper-style approximate spec (pixels and classes permuted) is not a symmetry.
    with pytest.raises(PermSpecError, match="label 'input'.*label 'output'"):
        check_perm_spec(task.apply, params, task.paper_perm_spec, inputs)


def test_non_finite_outputs_are_refused_not_passed():
    # NaN outputs compare equal under equal_nan, so any spec would pass: refuse to check.
    task, params, inputs = setup("mlp_fmnist_tiny", hidden_sizes=(8, 8))
    bad = relabel(
        task.perm_spec,
        lambda path, labs: ("Dense_1", "Dense_0") if path == "Dense_1/kernel" else labs,
    )
    nan_apply = lambda p, x: task.apply(p, x) * jnp.nan  # noqa: E731
    with pytest.raises(ValueError, match="not finite"):
        check_perm_spec(nan_apply, params, bad, inputs)


def test_transformer_wrong_specs_fail():
    task, params, inputs = setup("transformer_lm_tiny")
    # Value dims labelled like query/key dims (same size, so only the numbers can tell).
    swapped = relabel(
        task.perm_spec,
        lambda path, labs: tuple("block_0/qk" if lab == "block_0/v" else lab for lab in labs)
        if path.startswith("block_0/attention/value") else labs,
    )
    with pytest.raises(PermSpecError, match=r"block_0/(qk|v)'"):
        check_perm_spec(task.apply, params, swapped, inputs)
    # The residual stream split between blocks (as in the public Transformer spec).
    split = relabel(
        task.perm_spec,
        lambda path, labs: tuple("residual_b1" if path.startswith("block_1/") and lab == "residual"
                                 else lab for lab in labs),
    )
    with pytest.raises(PermSpecError, match="residual"):
        check_perm_spec(task.apply, params, split, inputs)


def test_noise_reveals_a_spec_that_symmetric_values_hide():
    task, params, inputs = setup("transformer_lm_tiny")
    # Dropping the label from the final LayerNorm scale: invisible while the scale is all ones.
    bad = relabel(
        task.perm_spec, lambda path, labs: (None,) if path == "ln_final/scale" else labs
    )
    check_perm_spec(task.apply, params, bad, inputs, noise_scale=0.0)
    with pytest.raises(PermSpecError, match="residual.*ln_final/bias axis 0"):
        check_perm_spec(task.apply, params, bad, inputs)


def test_spec_structure_errors_name_the_leaf():
    task, params, inputs = setup("mlp_fmnist_tiny")
    rank = relabel(task.perm_spec, lambda p, labs: ("Dense_0",) if p == "Dense_0/kernel" else labs)
    with pytest.raises(PermSpecError, match="Dense_0/kernel"):
        check_perm_spec(task.apply, params, rank, inputs)
    missing = {"Dense_0": task.perm_spec["Dense_0"]}
    with pytest.raises(PermSpecError, match="Dense_1"):
        check_perm_spec(task.apply, params, missing, inputs)


@pytest.mark.parametrize("name", ["mlp_fmnist_tiny", "cnn_cifar10_tiny", "rnn_lm_tiny"])
def test_infer_agrees_with_hand_written_specs(name):
    task = tasks.get_task(name, data_dir=DATA_DIR)
    params = jax.eval_shape(task.init, jax.random.key(0))
    assert infer_perm_spec(params) == task.perm_spec


def test_infer_recovers_the_call_order_or_asks_for_it():
    task = tasks.get_task("rnn_lm_tiny", data_dir=DATA_DIR)
    params = jax.eval_shape(task.init, jax.random.key(0))
    assert list(params) == ["Dense_0", "Embed_0", "RNN_0"]  # jit/eval_shape sort dict keys
    assert infer_perm_spec(params) == task.perm_spec
    dense = lambda i, o: {"kernel": jnp.zeros((i, o)), "bias": jnp.zeros(o)}
    ambiguous = {"b": dense(4, 4), "a": dense(3, 4), "c": dense(4, 4)}
    with pytest.raises(PermSpecError, match=r"chain in 2 orders.*order=\["):
        infer_perm_spec(ambiguous)
    spec = infer_perm_spec(ambiguous, order=["a", "c", "b"])
    assert spec["c"]["kernel"] == ("a", "c") and spec["b"]["kernel"] == ("c", None)
    two_embeddings = {"Embed_0": {"embedding": jnp.zeros((5, 4))},
                      "Embed_1": {"embedding": jnp.zeros((4, 4))}}
    with pytest.raises(PermSpecError, match="Embed layer Embed_1 is not the first"):
        infer_perm_spec(two_embeddings)


def test_infer_refuses_attention():
    transformer = tasks.get_task("transformer_lm_tiny", data_dir=DATA_DIR)
    with pytest.raises(PermSpecError, match="attention layer at block_0/attention"):
        infer_perm_spec(jax.eval_shape(transformer.init, jax.random.key(0)))


def test_infer_refuses_scan_stacked_layers_naming_the_leaf():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(16)(x)), None

    class Stacked(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16)(x)
            x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)()(x, None)
            return nn.Dense(4)(x)

    params = Stacked().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    with pytest.raises(PermSpecError, match=r"layer ScanBlock_0/Dense_0 holds stacked.*"
                       r"kernel \(3, 16, 16\), bias \(3, 16\)"):
        infer_perm_spec(params)
    # The spec the message suggests fits and is a symmetry of the model.
    spec = {"Dense_0": {"kernel": (None, "h"), "bias": ("h",)},
            "ScanBlock_0": {"Dense_0": {"kernel": (None, "h", "h"), "bias": (None, "h")}},
            "Dense_1": {"kernel": ("h", None), "bias": (None,)}}
    check_perm_spec(lambda p, x: Stacked().apply({"params": p}, x), params, spec,
                    jnp.ones((2, 8)))


def test_infer_refuses_flatten_between_conv_and_dense():
    class ConvFlat(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    params = ConvFlat().init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))["params"]
    with pytest.raises(PermSpecError, match="Dense_0.*reads 100 features.*Conv_0.*gives 4"):
        infer_perm_spec(params)


class GRULM(nn.Module):
    """Embed -> GRU cell over time -> LayerNorm -> Dense: a user model with a recurrent cell."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(20, 6)(tokens)
        cell = nn.GRUCell(7)
        h, outputs = jnp.zeros((x.shape[0], 7)), []
        for t in range(x.shape[1]):  # unrolled: compiles faster than nn.RNN's scan
            h, y = cell(h, x[:, t])
            outputs.append(y)
        return nn.Dense(20)(nn.LayerNorm()(jnp.stack(outputs, axis=1)))


def test_inferred_spec_of_a_flax_gru_model_is_a_symmetry():
    model = GRULM()
    tokens = jax.random.randint(jax.random.key(0), (8, 3), 0, 20)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    spec = infer_perm_spec(params)
    assert spec["GRUCell_0"]["hz"]["kernel"] == ("GRUCell_0", "GRUCell_0")
    assert spec["GRUCell_0"]["iz"]["kernel"] == ("Embed_0", "GRUCell_0")
    assert spec["LayerNorm_0"]["scale"] == ("GRUCell_0",)
    apply = lambda p, x: model.apply({"params": p}, x)
    assert check_perm_spec(apply, params, spec, tokens) == {"Embed_0": 6, "GRUCell_0": 7}

"""Weight-space-agnostic layers and optimizers: one parameter set for every weight space.

Checked on weight spaces never used in meta-training: equivariance under random permutations,
the same parameter count everywhere, agreement with ``UNFLinear`` when the sharing is undone
(``as_unf_variables``), scale independent of depth, and the agnostic optimizer training unseen
architectures through ``agnostic_optax`` / ``load_optax``.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import DeepSetLinear, UNFLinear
from learned_opt.spec import label_sizes, permute, random_permutations
from learned_opt.universal import (
    UniversalDeepSetLinear,
    UniversalUNFLinear,
    _matchings,
    as_unf_variables,
    map_type,
    map_types,
)
from learned_opt.weight_space import relax_fixed_axes


def _mlp(widths):
    params, spec = {}, {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lab_in = None if i == 0 else f"h{i - 1}"
        lab_out = None if i == len(widths) - 2 else f"h{i}"
        params[f"d{i}"] = {"kernel": (a, b), "bias": (b,)}
        spec[f"d{i}"] = {"kernel": (lab_in, lab_out), "bias": (lab_out,)}
    return params, spec


# Weight spaces: name -> (leaf shapes, spec). None of them is a task's weight space.
WEIGHT_SPACES = {
    "mlp_2": _mlp([5, 4, 3]),
    "mlp_5": _mlp([5, 4, 6, 4, 3, 2]),
    "cnn": ({"c0": {"kernel": (3, 3, 2, 4), "bias": (4,)},
             "c1": {"kernel": (3, 3, 4, 5), "bias": (5,)},
             "head": {"kernel": (5, 3), "bias": (3,)}},
            {"c0": {"kernel": (None, None, None, "a"), "bias": ("a",)},
             "c1": {"kernel": (None, None, "a", "b"), "bias": ("b",)},
             "head": {"kernel": ("b", None), "bias": (None,)}}),
    "rnn": ({"embed": (7, 3), "wi": (3, 4), "wh": (4, 4), "b": (4,), "out": (4, 7)},
            {"embed": (None, "e"), "wi": ("e", "h"), "wh": ("h", "h"), "b": ("h",),
             "out": ("h", None)}),
    "attention": ({"q": (4, 2, 3), "k": (4, 2, 3), "v": (4, 2, 2), "o": (2, 2, 4), "ln": (4,)},
                  {"q": ("r", "n", "qk"), "k": ("r", "n", "qk"), "v": ("r", "n", "v"),
                   "o": ("n", "v", "r"), "ln": ("r",)}),
    "rank5": ({"w": (2, 3, 2, 3, 4), "b": (4,)}, {"w": ("x", "y", "x", None, "z"), "b": ("z",)}),
}


def _inputs(shapes, channels, key):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s + (channels,))
                                        for k, s in zip(keys, leaves, strict=True)])


def _randomised(variables, key):
    """Nonzero biases and kernels unlike the init, so that every coefficient shows."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape)
                                        for k, x in zip(keys, leaves, strict=True)])


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_type_list_is_complete():
    """Leaves of rank 6 and 7 add no type to the list enumerated from ranks up to 5."""
    known = set(map_types())
    assert len(known) == len(map_types()) == 204
    for r_out, r_in in [(6, 6), (7, 3), (2, 7)]:
        for m in _matchings((0,) * r_out, (0,) * r_in):
            assert map_type(False, r_out, r_in, m) in known
        if r_out == r_in:
            for m in _matchings((0,) * r_out, (0,) * r_in):
                assert map_type(True, r_out, r_in, m) in known


@pytest.mark.parametrize("layer_cls", [UniversalUNFLinear, UniversalDeepSetLinear])
def test_same_parameters_for_every_weight_space(layer_cls):
    layer = layer_cls(features=3)
    counts = {}
    for name, (shapes, spec) in WEIGHT_SPACES.items():
        x = _inputs(shapes, 5, jax.random.key(0))
        variables = jax.eval_shape(lambda x, spec=spec: layer.init(jax.random.key(1), x, spec), x)
        counts[name] = jax.tree.map(lambda v: v.shape, variables)
    first = next(iter(counts.values()))
    assert all(c == first for c in counts.values()), counts


@pytest.mark.parametrize("name", sorted(WEIGHT_SPACES))
@pytest.mark.parametrize("layer_cls", [UniversalUNFLinear, UniversalDeepSetLinear])
def test_equivariant_on_unseen_weight_spaces(layer_cls, name):
    """Parameters from one weight space (an MLP), applied to another, commute with its
    permutations; a non-equivariant perturbation of the output would be detected."""
    shapes, spec = WEIGHT_SPACES[name]
    layer = layer_cls(features=2)
    mlp_shapes, mlp_spec = WEIGHT_SPACES["mlp_2"]
    variables = _randomised(layer.init(jax.random.key(0), _inputs(mlp_shapes, 3,
                                                                  jax.random.key(1)), mlp_spec),
                            jax.random.key(2))
    x = _inputs(shapes, 3, jax.random.key(3))
    rspec = relax_fixed_axes(spec)
    perms = random_permutations(jax.random.key(4), label_sizes(x, rspec, trailing_axes=1))
    apply = jax.jit(lambda v, x: layer.apply(v, x, spec))
    y = apply(variables, x)
    y_perm = apply(variables, permute(x, rspec, perms))
    assert _max_diff(permute(y, rspec, perms), y_perm) < 1e-4
    # The check can fail: an output that is not equivariant (a fixed position boosted) is caught.
    bump = jax.tree.map(lambda a: a.at[(0,) * a.ndim].add(1.0), y)
    assert _max_diff(permute(bump, rspec, perms), bump) > 0.5


@pytest.mark.parametrize("name", sorted(WEIGHT_SPACES))
def test_agrees_with_unflinear_when_sharing_undone(name):
    """The shared layer is a restricted UNFLinear: every map's coefficient is its type's,
    divided by the number of maps of that type into the output leaf; diagonal maps are 0."""
    shapes, spec = WEIGHT_SPACES[name]
    x = _inputs(shapes, 3, jax.random.key(0))
    layer = UniversalUNFLinear(features=2)
    variables = _randomised(layer.init(jax.random.key(1), x, spec), jax.random.key(2))
    y = layer.apply(variables, x, spec)
    y_unf = UNFLinear(features=2).apply(as_unf_variables(variables, x, spec), x,
                                        relax_fixed_axes(spec))
    assert _max_diff(y, y_unf) < 1e-4
    # Changing the coefficient of the first leaf's identity map changes the output, so the
    # comparison can fail.
    rank = len(jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))[0])
    t = map_types().index(map_type(True, rank, rank, tuple((a, a) for a in range(rank))))
    other = {"params": dict(variables["params"])}
    other["params"]["kernel"] = other["params"]["kernel"].at[t].add(1.0)
    assert _max_diff(layer.apply(other, x, spec), y_unf) > 1e-3


def test_deepset_universal_is_deepset_with_shared_weights():
    shapes, spec = WEIGHT_SPACES["cnn"]
    x = _inputs(shapes, 3, jax.random.key(0))
    uni = UniversalDeepSetLinear(4)
    v = _randomised(uni.init(jax.random.key(1), x, spec), jax.random.key(2))
    per_leaf = {}
    for o in range(len(jax.tree.leaves(x))):
        per_leaf |= {f"elem_{o}": v["params"]["elem"], f"mean_{o}": v["params"]["mean"],
                     f"bias_{o}": v["params"]["bias"]}
    y_ref = DeepSetLinear(4).apply({"params": per_leaf}, x, spec)
    assert _max_diff(uni.apply(v, x, spec), y_ref) < 1e-5


def test_depth_does_not_change_scale():
    """Maps of one type are averaged: a middle kernel of a 4- and of an 8-layer MLP receives the
    same output for the same (constant) inputs, although the deeper one has twice the leaves."""
    layer = UniversalUNFLinear(features=3)
    outs = []
    for depth in (4, 8):
        shapes, spec = _mlp([6] * (depth + 1))
        x = jax.tree.map(lambda s: jnp.ones(s + (2,)), shapes,
                         is_leaf=lambda s: isinstance(s, tuple))
        v = _randomised(layer.init(jax.random.key(0), x, spec), jax.random.key(1))
        outs.append(layer.apply(v, x, spec)["d2"]["kernel"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)


# ---------------------------------------------------------------------------- optimizers


def _sequential_mlp(widths, key):
    model = nn.Sequential([layer for w in widths[1:-1] for layer in (nn.Dense(w), nn.relu)]
                          + [nn.Dense(widths[-1])])
    return model, model.init(key, jnp.zeros((1, widths[0])))["params"]


@pytest.mark.parametrize("method", learned_opt.list_agnostic_optimizers())
def test_agnostic_meta_parameters_fit_every_weight_space(method):
    counts = set()
    for shapes, spec in WEIGHT_SPACES.values():
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                              is_leaf=lambda s: isinstance(s, tuple))
        lopt = learned_opt.learned_optimizer(method, params, spec)
        assert lopt.agnostic
        counts.add(lopt.num_meta_params())
    assert len(counts) == 1, counts


def _regression(model, params, steps, tx, key=0):
    x = jax.random.normal(jax.random.key(key), (64, 8))
    y = jnp.sin(x[:, :1] * 2) + x[:, 1:2]

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    state = tx.init(params)

    @jax.jit
    def step(p, s):
        val, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, val

    losses = []
    for _ in range(steps):
        params, state, val = step(params, state)
        losses.append(float(val))
    return losses


def test_agnostic_optax_trains_unseen_architectures(tmp_path):
    """Meta-parameters made on a small MLP, saved, loaded by path with no spec: train a deeper,
    wider nn.Sequential MLP (spec inferred) and the loss goes down."""
    shapes, spec = WEIGHT_SPACES["mlp_2"]
    params = jax.tree.map(lambda s: jnp.zeros(s), shapes, is_leaf=lambda s: isinstance(s, tuple))
    lopt = learned_opt.learned_optimizer("unf_universal", params, spec, init_alpha=0.02)
    learned_opt.save(tmp_path / "opt", lopt, lopt.init(jax.random.key(0)))
    tx = learned_opt.load_optax(tmp_path / "opt")
    model, p = _sequential_mlp([8, 32, 32, 32, 1], jax.random.key(1))
    losses = _regression(model, p, 60, tx)
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]


def test_agnostic_optax_asks_for_a_spec_it_cannot_infer():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.SelfAttention(num_heads=2, qkv_features=4)(x)

    params = Attn().init(jax.random.key(0), jnp.zeros((1, 3, 4)))["params"]
    meta = learned_opt.learned_optimizer("unf_universal", params, jax.tree.map(
        lambda p: (None,) * p.ndim, params)).init(jax.random.key(0))
    tx = learned_opt.agnostic_optax("unf_universal", meta)
    with pytest.raises(learned_opt.PermSpecError, match="pass perm_spec"):
        tx.init(params)


def test_binding_methods_refused_by_agnostic_optax():
    with pytest.raises(ValueError, match="binds its meta-parameters"):
        learned_opt.agnostic_optax("unf", {})


def test_per_layout_checkpoint_accepts_other_names_same_structure(tmp_path):
    """A checkpoint made on Dense_0/Dense_1 trains the same network written with nn.Sequential
    (layers_0/layers_2) with exactly the same updates; a differently wired one is refused."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(16)(x))  # created first: Dense_0
            return nn.Dense(1)(h)

    p_plain = Plain().init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    lopt = learned_opt.learned_optimizer("unf", p_plain)
    learned_opt.save(tmp_path / "opt", lopt, lopt.init(jax.random.key(1)))
    tx = learned_opt.load_optax(tmp_path / "opt")
    model, p_seq = _sequential_mlp([8, 16, 1], jax.random.key(0))
    assert set(p_seq) == {"layers_0", "layers_2"}
    # The same values under the other names (Flax's inits differ by module path).
    p_seq = jax.tree.unflatten(jax.tree.structure(p_seq), jax.tree.leaves(p_plain))
    l_seq = _regression(model, p_seq, 5, tx)
    l_plain = _regression(Plain(), p_plain, 5, tx)
    np.testing.assert_allclose(l_seq, l_plain, rtol=1e-6)
    # Same ranks and leaf count, other wiring: the output layer's input is not the hidden one.
    wrong = {"a": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
             "b": {"kernel": jnp.zeros((8, 1)), "bias": jnp.zeros(1)}}
    wrong_spec = {"a": {"kernel": (None, "h"), "bias": ("h",)},
                  "b": {"kernel": (None, None), "bias": (None,)}}
    with pytest.raises(learned_opt.PermSpecError, match="wired differently"):
        lopt.as_optax(lopt.init(jax.random.key(1)), perm_spec=wrong_spec).init(wrong)
    with pytest.raises(learned_opt.PermSpecError, match="another architecture"):
        tx.init(_sequential_mlp([8, 16, 16, 1], jax.random.key(0))[1])


def test_shipped_optimizers_train_unseen_weight_spaces():
    """Every shipped optimizer loads by name, offline, and trains an MLP it never saw (loss
    down, all finite)."""
    names = learned_opt.list_pretrained()
    assert names, "the package ships at least one pretrained optimizer"
    for name in names:
        tx = learned_opt.load_optax(name, num_steps=80)
        model, p = _sequential_mlp([8, 64, 64, 1], jax.random.key(2))
        losses = _regression(model, p, 80, tx)
        assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], (name, losses[::10])
    with pytest.raises(learned_opt.CheckpointError, match="shipped"):
        learned_opt.load_optax("no_such_optimizer")


def test_heldout_architectures_have_true_specs():
    """The architectures the shipped optimizers are evaluated on: their specs are symmetries,
    and none of them is a meta-training task's weight space (the paper's four, the family)."""
    import tasks
    from meta_train.experiments.heldout import get_heldout, list_heldout

    trained = set()
    for name in ("mlp_fmnist", "cnn_cifar10", "rnn_lm", "transformer_lm", *tasks.FAMILY):
        shapes = jax.eval_shape(tasks.get_task(name).init, jax.random.key(0))
        trained.add(str(jax.tree.map(lambda x: x.shape, shapes)))
    for name in list_heldout():
        task = get_heldout(name)
        shapes = jax.eval_shape(task.init, jax.random.key(0))
        assert str(jax.tree.map(lambda x: x.shape, shapes)) not in trained, name
        if sum(x.size for x in jax.tree.leaves(shapes)) > 2_000_000:
            # the 10M MLP: its spec must fit (a smaller MLP of the same builder is checked below)
            learned_opt.spec.label_sizes(shapes, task.perm_spec)
            continue
        params = task.init(jax.random.key(0))
        batch = task.sample_batch(jax.random.key(1))
        learned_opt.check_perm_spec(task.apply, params, task.perm_spec, batch["inputs"][:4])

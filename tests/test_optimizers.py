"""Tests of the learned optimizers: equivariance, the nominal rule, sizes, optax, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
from learned_opt import hand_designed
from learned_opt.features import (
    build_features,
    progress_embedding,
    step_embedding,
    update_momenta,
)
from learned_opt.network import METHODS
from learned_opt.optimizer import LearnedOptimizerState
from learned_opt.spec import PermSpecError, label_sizes, permute
from learned_opt.weight_space import relax_fixed_axes

# ---------------------------------------------------------------- tiny weight spaces


def _dense(n_in, n_out, lab_in, lab_out):
    return ({"kernel": (n_in, n_out), "bias": (n_out,)},
            {"kernel": (lab_in, lab_out), "bias": (lab_out,)})


def mlp_space(hidden=5, n_in=6, n_out=3):
    """64-32-10-like MLP: input pixels and output classes fixed (None)."""
    s0, l0 = _dense(n_in, hidden, None, "h")
    s1, l1 = _dense(hidden, n_out, "h", None)
    return {"Dense_0": s0, "Dense_1": s1}, {"Dense_0": l0, "Dense_1": l1}


def cnn_space():
    """conv 3x3 (2 -> 4) -> conv 3x3 (4 -> 5) -> pool -> linear 5 -> 3; spatial axes fixed."""
    shapes = {"Conv_0": {"kernel": (3, 3, 2, 4), "bias": (4,)},
              "Conv_1": {"kernel": (3, 3, 4, 5), "bias": (5,)},
              "Dense_0": {"kernel": (5, 3), "bias": (3,)}}
    spec = {"Conv_0": {"kernel": (None, None, None, "c0"), "bias": ("c0",)},
            "Conv_1": {"kernel": (None, None, "c0", "c1"), "bias": ("c1",)},
            "Dense_0": {"kernel": ("c1", None), "bias": (None,)}}
    return shapes, spec


def rnn_space(vocab=7, emb=4, hidden=6):
    """Embedding -> ReLU RNN with a (h, h) recurrent matrix and learned initial state -> vocab."""
    shapes = {"embed": (vocab, emb), "w_in": (emb, hidden), "w_rec": (hidden, hidden),
              "b": (hidden,), "h0": (hidden,), "out": {"kernel": (hidden, vocab), "bias": (vocab,)}}
    spec = {"embed": (None, "e"), "w_in": ("e", "h"), "w_rec": ("h", "h"), "b": ("h",),
            "h0": ("h",), "out": {"kernel": ("h", None), "bias": (None,)}}
    return shapes, spec


def transformer_space(vocab=6, d=4, heads=2, head_dim=2, mlp=5):
    """One pre-LayerNorm block: residual label d, head label, q/k and v/out head-dim labels."""
    block_shapes = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "query": (d, heads, head_dim), "key": (d, heads, head_dim),
        "value": (d, heads, head_dim), "out": (heads, head_dim, d),
        "ln2": {"scale": (d,), "bias": (d,)},
        "fc1": {"kernel": (d, mlp), "bias": (mlp,)}, "fc2": {"kernel": (mlp, d), "bias": (d,)}}
    block_spec = {
        "ln1": {"scale": ("d",), "bias": ("d",)},
        "query": ("d", "heads", "qk"), "key": ("d", "heads", "qk"),
        "value": ("d", "heads", "v"), "out": ("heads", "v", "d"),
        "ln2": {"scale": ("d",), "bias": ("d",)},
        "fc1": {"kernel": ("d", "m"), "bias": ("m",)},
        "fc2": {"kernel": ("m", "d"), "bias": ("d",)}}
    # (No final LayerNorm: two more "d" leaves add compile time, not coverage.)
    shapes = {"embed": (vocab, d), "block_0": block_shapes,
              "head": {"kernel": (d, vocab), "bias": (vocab,)}}
    spec = {"embed": (None, "d"), "block_0": block_spec,
            "head": {"kernel": ("d", None), "bias": (None,)}}
    return shapes, spec


SPACES = {"mlp": mlp_space, "cnn": cnn_space, "rnn": rnn_space, "transformer": transformer_space}


def is_shape(x):
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def random_tree(seed, shapes, scale=1.0):
    """Standard normal float32 leaves (numpy draws: no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for s in leaves])


def warm_state(update, lopt, meta, params, seed, steps=2):
    """A state with non-zero momenta and step > 0 (random gradients)."""
    state = lopt.init_state(meta, params)
    for i in range(steps):
        grads = random_tree(seed + i, jax.tree.map(jnp.shape, params))
        _, state = update(meta, state, grads, params)
    return state


def progress_scale(lopt, meta, step, num_steps):
    """exp(progress_gain . e) of the learned schedule, by hand (1.0 without progress)."""
    centres = np.asarray(lopt.config.progress_centres)
    if not len(centres):
        return 1.0
    p = min(max(int(step) / num_steps, 0.0), 1.0)
    return float(np.exp(np.dot(np.asarray(meta["progress_gain"]), np.tanh(10 * (p - centres)))))


def assert_trees_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ---------------------------------------------------------------- equivariance

# Rule options under test (beyond the paper's defaults), by name.
RULE_OPTIONS = {
    "paper": {},
    # The scaled network term (a per-tensor statistic: invariant) keeps the rule equivariant.
    "momentum_rms": {"network_scale": "momentum_rms"},
    # Training progress is one vector for all parameters, the tangent projection uses
    # whole-tensor inner products (both invariant): same.
    "progress": {"network_scale": "momentum_rms", "network_tangent": True,
                 "progress_centres": (0.1, 0.5, 0.9)},
    # m_d / sqrt(v) is elementwise, then normalised over whole tensors: same.
    "adam": {"network_scale": "momentum_rms", "adam_features": True, "clip_features": False},
    # rms(m) / rms(f) is a ratio of per-tensor statistics: invariant.
    "normalised": {"network_scale": "normalised", "network_tangent": True},
}
NETWORK_METHODS = [m for m in sorted(METHODS) if m != "sgdm"]  # nominal rule; sgdm: no network
EQUIVARIANCE_CASES = [(m, s, "paper") for m in NETWORK_METHODS
                      for s in SPACES if not (m == "nfn" and s in ("rnn", "transformer"))]
EQUIVARIANCE_CASES += [("unf", "mlp", "momentum_rms"), ("deepset", "rnn", "momentum_rms"),
                       ("unf", "cnn", "progress"), ("unf", "mlp", "adam"),
                       ("deepset", "cnn", "normalised")]


def numpy_permutations(seed, sizes):
    """One random permutation per label (numpy: no per-size compilation in tests)."""
    rng = np.random.default_rng(seed)
    return {lab: jnp.asarray(rng.permutation(n)) for lab, n in sorted(sizes.items(), key=repr)}


@pytest.mark.parametrize("method,space,rule", EQUIVARIANCE_CASES)
def test_update_is_equivariant(method, space, rule):
    shapes, spec = SPACES[space]()
    params = random_tree(1, shapes, 0.5)
    # unf_deep: 4 UNF layers on the MLP; 2 elsewhere (the same layers stacked, compiles faster).
    config = {"num_layers": 2} if method == "unf_deep" and space != "mlp" else {}
    config |= RULE_OPTIONS[rule]
    lopt = learned_opt.learned_optimizer(method, params, spec, **config)
    meta = lopt.init(jax.random.key(2))
    meta["beta"] = jnp.float32(1.0)  # make the network term as large as the momentum term
    if "progress_gain" in meta:
        meta["progress_gain"] = jnp.asarray([0.2, -0.1, 0.3])  # exp(gain . e) is ~1.12 here
    update = jax.jit(functools.partial(lopt.update, num_steps=5))
    state = warm_state(update, lopt, meta, params, 3)
    grads = random_tree(4, shapes)
    updates, _ = update(meta, state, grads, params)

    # The network term is really there (otherwise equivariance would be trivial).
    m = jax.tree.map(lambda m, g: 0.9 * m + g, state.momentum, grads)
    alpha = float(lopt.nominal(meta)["alpha"]) * progress_scale(lopt, meta, state.step, 5)
    net_term = [np.abs(np.asarray(u) + alpha * np.asarray(mm)).max()
                for u, mm in zip(jax.tree.leaves(updates), jax.tree.leaves(m), strict=True)]
    assert max(net_term) > 1e-3 * alpha

    # Permute every label the network is equivariant to (for "relax", the fresh labels of the
    # fixed axes too: a larger group than the task's, which contains it).
    sp = lopt.net_spec
    perms = numpy_permutations(5, label_sizes(params, sp))
    assert any(not np.array_equal(p, np.arange(len(p))) for p in perms.values())

    perm = jax.jit(lambda tree, perms: permute(tree, sp, perms))  # one compile per layout
    fm = state.feature_momenta
    p_state = LearnedOptimizerState(step=state.step, momentum=perm(state.momentum, perms),
                                    feature_momenta=fm if fm == () else perm(fm, perms))
    p_updates, _ = update(meta, p_state, perm(grads, perms), perm(params, perms))
    assert_trees_close(p_updates, perm(updates, perms), rtol=1e-4, atol=1e-6)

    # The check can fail: the same inputs with the parameters (only) permuted another way give
    # updates that are not the permuted ones.
    other = numpy_permutations(6, label_sizes(params, sp))
    wrong, _ = update(meta, p_state, perm(grads, perms), perm(params, other))
    diffs = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(wrong), jax.tree.leaves(perm(updates, perms)),
                             strict=True)]
    assert max(diffs) > 1e-4 * alpha


def test_nfn_rejects_other_weight_spaces():
    shapes, spec = rnn_space()
    params = random_tree(0, shapes)
    with pytest.raises(PermSpecError, match="nfn supports MLP and CNN weight spaces only"):
        learned_opt.learned_optimizer("nfn", params, spec)


# ---------------------------------------------------------------- the nominal rule


@pytest.mark.parametrize("method", ["unf", "sgdm"])
def test_beta_zero_is_exactly_sgd_momentum(method):
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    lopt = learned_opt.learned_optimizer(method, params, spec)
    meta = lopt.init(jax.random.key(1))
    if method == "unf":
        meta["beta"] = jnp.float32(0.0)
    nom = lopt.nominal(meta)
    sgd = optax.sgd(nom["alpha"], momentum=nom["decay"])
    state, sgd_state = lopt.init_state(meta, params), sgd.init(params)
    # Both jitted: XLA may fuse a * m + g into one FMA, which eager execution does not.
    update, sgd_update = jax.jit(lopt.update), jax.jit(sgd.update)
    p_l = p_s = params
    for i in range(4):
        grads = random_tree(10 + i, shapes)
        u_l, state = update(meta, state, grads, p_l)
        u_s, sgd_state = sgd_update(grads, sgd_state, p_s)
        for a, b in zip(jax.tree.leaves(u_l), jax.tree.leaves(u_s), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        p_l, p_s = optax.apply_updates(p_l, u_l), optax.apply_updates(p_s, u_s)


def test_average_momentum_form_is_sgd_momentum_at_a_decay_scaled_step():
    # momentum_form="average" (the authors' public code): m <- decay m + (1 - decay) g, so with
    # beta 0 the rule is SGD-momentum at learning rate alpha (1 - decay).
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    lopt = learned_opt.learned_optimizer("sgdm", params, spec, momentum_form="average")
    meta = lopt.init(jax.random.key(1))
    nom = lopt.nominal(meta)
    sgd = optax.sgd(nom["alpha"] * (1 - nom["decay"]), momentum=nom["decay"])
    state, sgd_state = lopt.init_state(meta, params), sgd.init(params)
    for i in range(4):
        grads = random_tree(10 + i, shapes)
        u_l, state = lopt.update(meta, state, grads, params)
        u_s, sgd_state = sgd.update(grads, sgd_state, params)
        assert_trees_close(u_l, u_s, rtol=1e-5, atol=1e-8)


def test_nominal_init_values_and_counts():
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    for name in ("unf", "sgdm"):
        lopt = learned_opt.learned_optimizer(name, params, spec)
        meta = lopt.init(jax.random.key(0))
        nom = lopt.nominal(meta)
        np.testing.assert_allclose(float(nom["alpha"]), 0.1, rtol=1e-6)
        np.testing.assert_allclose(float(nom["decay"]), 0.9, rtol=1e-6)
        assert nom["beta"] == (np.float32(0.0) if name == "sgdm" else np.float32(0.001))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(meta))
    # Per-parameter part: 19 -> 32 -> 32 -> 32 Dense layers (paper: 2,752 weights), plus the
    # last UNF layer: one 32 x 1 matrix per basis map of every leaf pair, one bias per leaf.
    unf = learned_opt.learned_optimizer("unf", params, spec)
    net = unf.net_spec
    labels = [lab for _, lab in learned_opt.spec_leaves(net)]
    maps = sum(learned_opt.num_basis_terms(o, i) for o in labels for i in labels)
    pointwise = (19 * 32 + 32) + 2 * (32 * 32 + 32)
    assert pointwise == 2752
    assert unf.num_meta_params() == 3 + pointwise + 32 * maps + len(labels)
    assert learned_opt.learned_optimizer("sgdm", params).num_meta_params() == 2


def test_features():
    emb = step_embedding(jnp.int32(10), (1.0, 10.0, 100.0))
    np.testing.assert_allclose(emb, np.tanh([9.0, 0.0, -0.9]), rtol=1e-6)
    params = {"w": jnp.array([[3.0, -0.5], [0.25, 0.0]])}
    grads = {"w": jnp.array([[1e-3, -2e-3], [0.0, 4e-3]])}
    mom = update_momenta({"w": jnp.zeros((2, 2, 2))}, grads, (0.5, 0.9))
    np.testing.assert_allclose(mom["w"][..., 1], 0.1 * grads["w"], rtol=1e-6)
    x = build_features(params, grads, mom, jnp.int32(0), (1.0,))["w"]
    assert x.shape == (2, 2, 5)
    # Each state channel: clipped to [-1, 1], then unit RMS over the tensor.
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(x[..., :4]), axis=(0, 1))), 1.0,
                               rtol=1e-4)
    clipped = np.clip(np.asarray(params["w"]), -1, 1)
    np.testing.assert_allclose(x[..., 0], clipped / np.sqrt(np.mean(clipped ** 2)), rtol=1e-5)
    np.testing.assert_allclose(x[..., 4], np.tanh(-1.0), rtol=1e-6)


# ---------------------------------------------------------------- structure and sizes


def test_built_on_32_units_updates_128_units():
    shapes32, spec = mlp_space(hidden=32, n_in=64, n_out=10)
    shapes128, _ = mlp_space(hidden=128, n_in=64, n_out=10)
    p32 = random_tree(0, shapes32)
    p128 = random_tree(1, shapes128)
    name = "unf"
    small = learned_opt.learned_optimizer(name, p32, spec)
    meta = small.init(jax.random.key(2))
    meta["beta"] = jnp.float32(1.0)
    state = small.init_state(meta, p128)
    grads = random_tree(3, shapes128)
    updates, state = jax.jit(small.update)(meta, state, grads, p128)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, p128)
    # The same function as an optimizer built on the large network directly.
    big = learned_opt.learned_optimizer(name, p128, spec)
    ref, _ = jax.jit(big.update)(meta, big.init_state(meta, p128), grads, p128)
    assert_trees_close(updates, ref, rtol=1e-6, atol=1e-7)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_structure_mismatch_names_the_leaf():
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    lopt = learned_opt.learned_optimizer("unf", params, spec)
    meta = lopt.init(jax.random.key(1))
    extra = dict(params, Dense_2={"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros(3)})
    with pytest.raises(PermSpecError, match="Dense_2"):
        lopt.init_state(meta, extra)
    renamed = {"Dense_0": params["Dense_0"], "Other": params["Dense_1"]}
    with pytest.raises(PermSpecError, match="Dense_1/bias"):
        lopt.init_state(meta, renamed)
    rank = jax.tree.map(lambda x: x, params)
    rank["Dense_1"]["bias"] = jnp.zeros((3, 1))
    with pytest.raises(PermSpecError, match="Dense_1/bias"):
        lopt.init_state(meta, rank)
    sizes = jax.tree.map(lambda x: x, params)
    sizes["Dense_0"]["bias"] = jnp.zeros(7)  # "h" is 5 in the kernels
    with pytest.raises(PermSpecError, match="'h'"):
        lopt.init_state(meta, sizes)
    # nfn's parameters depend on the fixed input size: a different one is refused.
    nfn = learned_opt.learned_optimizer("nfn", params, spec)
    wide, _ = mlp_space(n_in=8)
    with pytest.raises(PermSpecError, match="Dense_0/kernel axis 0"):
        nfn.init_state(nfn.init(jax.random.key(0)), random_tree(0, wide))


def test_bad_options():
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    with pytest.raises(ValueError, match="unknown learned optimizer 'adamw'"):
        learned_opt.learned_optimizer("adamw", params, spec)
    with pytest.raises(ValueError, match="fixed_axes"):
        learned_opt.learned_optimizer("unf", params, spec, fixed_axes="nope")
    with pytest.raises(ValueError, match="hiden_features"):
        learned_opt.learned_optimizer("unf", params, spec, hiden_features=3)
    with pytest.raises(PermSpecError, match="Dense_1/kernel"):
        bad = {"Dense_0": spec["Dense_0"], "Dense_1": {"kernel": ("h",), "bias": (None,)}}
        learned_opt.learned_optimizer("unf", params, bad)


@pytest.mark.parametrize("method", ["unf", "sgdm"])
def test_params_the_rule_cannot_update_name_the_leaf(method):
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    with pytest.raises(ValueError, match="no array leaves"):
        learned_opt.learned_optimizer(method, {}, {})
    as_int = params | {"Dense_1": params["Dense_1"] | {"bias": jnp.zeros(2, jnp.int32)}}
    with pytest.raises(ValueError, match="Dense_1/bias has dtype int32"):
        learned_opt.learned_optimizer(method, as_int, spec)
    lopt = learned_opt.learned_optimizer(method, params, spec)
    with pytest.raises(ValueError, match="Dense_1/bias has dtype int32"):
        lopt.init_state(lopt.init(jax.random.key(0)), as_int)
    empty = params | {"Dense_0": {"kernel": jnp.zeros((shapes["Dense_0"]["kernel"][0], 0)),
                                  "bias": jnp.zeros(0)}}
    with pytest.raises(ValueError, match=r"Dense_0/\w+ has shape .*an axis of size 0"):
        learned_opt.learned_optimizer(method, empty, spec)


def test_relax_and_channels_counts():
    """relax: count independent of every size; channels: fixed sizes enter the count."""
    counts = {}
    for n_in, hidden in ((6, 5), (9, 11)):
        shapes, spec = mlp_space(hidden=hidden, n_in=n_in)
        params = random_tree(0, shapes)
        for mode in ("relax", "channels"):
            lopt = learned_opt.learned_optimizer("unf", params, spec, fixed_axes=mode)
            counts[mode, n_in, hidden] = lopt.num_meta_params()
    assert counts["relax", 6, 5] == counts["relax", 9, 11]
    assert counts["channels", 6, 5] != counts["channels", 9, 11]
    relaxed = relax_fixed_axes(mlp_space()[1])
    assert relaxed["Dense_0"]["kernel"] == ("fixed:Dense_0/kernel:0", "h")


def test_vmap_over_population_matches_loop():
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    lopt = learned_opt.learned_optimizer("deepset", params, spec)
    metas = [lopt.init(jax.random.key(i)) for i in range(3)]
    for i, m in enumerate(metas):
        m["beta"] = jnp.float32(0.5 + i)
    grads = [random_tree(10 + i, shapes) for i in range(3)]
    states = [lopt.init_state(m, params) for m in metas]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
    batched, _ = jax.jit(jax.vmap(lopt.update, in_axes=(0, 0, 0, 0)))(
        stack(metas), stack(states), stack(grads), stack([params] * 3))
    update = jax.jit(lopt.update)
    for i in range(3):
        single, _ = update(metas[i], states[i], grads[i], params)
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], batched), single,
                           rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- optax


def test_as_optax_requires_params_and_composes():
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    # The composition does not depend on the method: sgdm (no network) keeps this test fast.
    lopt = learned_opt.learned_optimizer("sgdm", params, spec)
    meta = lopt.init(jax.random.key(1))
    tx = lopt.as_optax(meta)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    grads = random_tree(2, shapes)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads, tx.init(params))
    # Weight decay on kernels only, inside a jitted step.
    mask = jax.tree.map(lambda x: x.ndim == 2, params)
    chain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.masked(optax.add_decayed_weights(1e-2), mask), tx)
    u, _ = jax.jit(chain.update)(grads, chain.init(params), params)
    clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
    decayed = jax.tree.map(lambda g, p, k: g + 1e-2 * p * k, clipped, params, mask)
    ref, _ = lopt.update(meta, lopt.init_state(meta, params), decayed, params)
    assert_trees_close(u, ref, rtol=1e-5, atol=1e-7)
    # The learned optimizer itself cannot be masked: its network needs the whole weight space.
    with pytest.raises(PermSpecError, match="masked"):
        optax.masked(tx, mask).init(params)


def test_as_optax_trains_mlp_task():
    import tasks

    task = tasks.get_task("mlp_fmnist_tiny")
    params = task.init(jax.random.key(0))
    lopt = learned_opt.learned_optimizer("unf", params, task.perm_spec)
    # Random meta-parameters near the initialisation (an ES population member).
    meta = lopt.init(jax.random.key(1))
    noise = random_tree(2, jax.tree.map(jnp.shape, meta), 0.01)
    meta = jax.tree.map(jnp.add, meta, noise)
    tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.as_optax(meta))

    @jax.jit
    def step(params, opt_state, key):
        batch = task.sample_batch(key)
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for i in range(100):
        params, opt_state, loss = step(params, opt_state, jax.random.key(100 + i))
        losses.append(float(loss))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert first > math.log(10) * 0.8
    assert last < 0.8 * first, (first, last)


def test_hand_designed_baselines():
    shapes, _ = mlp_space()
    params = random_tree(0, shapes)
    grads = random_tree(1, shapes)
    from meta_train.evaluation import BASELINES, build, grid_points

    for grid in (hand_designed.LR_GRID, hand_designed.ADAM_LR_GRID, hand_designed.SGDM_LR_GRID):
        assert list(grid) == sorted(grid) and len(grid) >= 5
    for name, cand in BASELINES.items():
        tx = build(cand, None, 100, **grid_points(cand.grid)[0])
        u, _ = tx.update(grads, tx.init(params), params)
        assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params), name
    u, _ = hand_designed.sgdm(0.1).update(grads, hand_designed.sgdm(0.1).init(params))
    assert_trees_close(u, jax.tree.map(lambda g: -0.1 * g, grads), rtol=1e-6)
    # AdamW + cosine: zero at step 0 (warm-up from 0), the peak after 5% of the steps.
    schedule = hand_designed.warmup_cosine(1e-2, 100)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 1e-2) < 1e-9


# ---------------------------------------------------------------- network-term scaling


def test_momentum_rms_network_term_shrinks_with_the_gradients():
    # With network_scale="momentum_rms" the whole update is proportional to the gradients' scale
    # (the features are scale-free, the nominal and network terms both carry rms(m)); with the
    # paper's rule the network term keeps its size when the gradients vanish.
    shapes, spec = mlp_space()
    params = random_tree(0, shapes, 0.5)
    # Inside [-1, 1], so clipping does not act; 10x smaller keeps every channel well above the
    # normaliser's epsilon (the 0.9999 momentum is 1e-4 g after one step).
    grads = jax.tree.map(lambda g: jnp.clip(g, -0.9, 0.9), random_tree(1, shapes, 0.3))
    small = jax.tree.map(lambda g: 0.1 * g, grads)
    ratios, u_none = {}, None
    for scale in ("none", "momentum_rms"):
        lopt = learned_opt.learned_optimizer("unf", params, spec, network_scale=scale)
        meta = lopt.init(jax.random.key(2))
        meta["beta"] = jnp.float32(1.0)
        update = jax.jit(lopt.update)
        state = lopt.init_state(meta, params)
        u_big, _ = update(meta, state, grads, params)
        u_small, _ = update(meta, state, small, params)
        ratios[scale] = [float(jnp.linalg.norm(a) / jnp.linalg.norm(b))
                         for a, b in zip(jax.tree.leaves(u_small), jax.tree.leaves(u_big),
                                         strict=True)]
        if scale == "momentum_rms":
            # Against the brute-force formula: alpha * (m + beta * rms(m) * f), f from "none".
            alpha = float(lopt.nominal(meta)["alpha"])
            for u_s, u_n, g in zip(jax.tree.leaves(u_big), jax.tree.leaves(u_none),
                                   jax.tree.leaves(grads), strict=True):
                f = -np.asarray(u_n) / alpha - np.asarray(g)
                rms = np.sqrt(np.mean(np.square(np.asarray(g))))
                np.testing.assert_allclose(-np.asarray(u_s) / alpha, np.asarray(g) + rms * f,
                                           rtol=1e-4, atol=1e-7)
        u_none = u_big
    np.testing.assert_allclose(ratios["momentum_rms"], 0.1, rtol=0.02)
    assert min(ratios["none"]) > 0.15  # the paper's network term shrinks far less


def test_normalised_network_term_is_beta_times_the_momentum_rms():
    # network_scale="normalised": alpha * (m + beta * rms(m) * f / rms(f)) per tensor, so the
    # network term's RMS is |beta| rms(m) whatever f's size (f taken from the paper's rule).
    shapes, spec = mlp_space()
    params = random_tree(0, shapes, 0.5)
    grads = random_tree(1, shapes, 0.3)
    out = {}
    for scale in ("none", "normalised"):
        lopt = learned_opt.learned_optimizer("unf", params, spec, network_scale=scale)
        meta = lopt.init(jax.random.key(2)) | {"beta": jnp.float32(-0.5)}
        updates, _ = jax.jit(lopt.update)(meta, lopt.init_state(meta, params), grads, params)
        alpha = float(lopt.nominal(meta)["alpha"])
        out[scale] = [-np.asarray(u, np.float64) / alpha for u in jax.tree.leaves(updates)]
    for u_none, u_norm, g in zip(out["none"], out["normalised"], jax.tree.leaves(grads),
                                 strict=True):
        g = np.asarray(g, np.float64)
        f = (u_none - g) / -0.5
        rms = lambda x: np.sqrt(np.mean(np.square(x)))  # noqa: E731
        np.testing.assert_allclose(u_norm, g - 0.5 * rms(g) * f / rms(f), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(rms(u_norm - g), 0.5 * rms(g), rtol=1e-4)



# ---------------------------------------------------------------- training progress


def test_progress_embedding_against_the_formula():
    centres = (0.03, 0.5, 1.1)
    for step, n in [(0, 10), (3, 10), (10, 10), (25, 10), (7, 1)]:
        p = min(step / n, 1.0)  # past num_steps the last step's value is kept
        np.testing.assert_allclose(progress_embedding(jnp.int32(step), jnp.int32(n), centres),
                                   np.tanh(10 * (p - np.asarray(centres))), rtol=1e-6)


def test_progress_schedule_against_brute_force():
    # sgdm with progress: update = -alpha * exp(gain . e(t / N)) * m, step by step; zero gain
    # is exactly the plain rule; a different N changes the steps.
    shapes, _ = mlp_space()
    params = random_tree(0, shapes)
    centres = (0.1, 0.5, 0.9)
    lopt = learned_opt.learned_optimizer("sgdm", params, progress_centres=centres)
    plain = learned_opt.learned_optimizer("sgdm", params)
    meta = lopt.init(jax.random.key(0))
    assert np.all(np.asarray(meta["progress_gain"]) == 0)
    gained = meta | {"progress_gain": jnp.asarray([0.5, -1.0, 2.0])}
    update = jax.jit(lopt.update)
    s_plain, s_zero, s_gain = (plain.init_state(meta, params), lopt.init_state(meta, params),
                               lopt.init_state(meta, params))
    m = jax.tree.map(jnp.zeros_like, params)
    for t in range(6):  # N=4: the last two steps are past the end (clipped progress)
        grads = random_tree(10 + t, shapes)
        u_plain, s_plain = plain.update(plain.init(jax.random.key(0)), s_plain, grads, params)
        u_zero, s_zero = update(meta, s_zero, grads, params, 4)
        u_gain, s_gain = update(gained, s_gain, grads, params, 4)
        assert_trees_close(u_zero, u_plain, rtol=1e-5, atol=1e-8)
        m = jax.tree.map(lambda m, g: 0.9 * m + g, m, grads)
        scale = progress_scale(lopt, gained, t, 4)
        assert_trees_close(u_gain, jax.tree.map(lambda m: -0.1 * scale * m, m), rtol=1e-5)
    u_other, _ = update(gained, s_gain._replace(step=jnp.int32(1)), grads, params, 8)
    u_four, _ = update(gained, s_gain._replace(step=jnp.int32(1)), grads, params, 4)
    assert not np.allclose(np.asarray(u_other["Dense_0"]["bias"]),
                           np.asarray(u_four["Dense_0"]["bias"]))


def test_progress_reaches_the_network():
    # With the schedule off (gain 0) the network term alone must depend on the progress.
    shapes, spec = mlp_space()
    params = random_tree(0, shapes, 0.5)
    lopt = learned_opt.learned_optimizer("unf", params, spec, progress_centres=(0.2, 0.8))
    meta = lopt.init(jax.random.key(1)) | {"beta": jnp.float32(1.0)}
    state = lopt.init_state(meta, params)._replace(step=jnp.int32(5))
    grads = random_tree(2, shapes)
    early, _ = lopt.update(meta, state, grads, params, num_steps=100)
    late, _ = lopt.update(meta, state, grads, params, num_steps=6)
    diff = max(float(jnp.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(early), jax.tree.leaves(late), strict=True))
    assert diff > 1e-4


@pytest.mark.parametrize("method", ["unf_universal", "deepset"])
def test_non_finite_gradient_entries_stay_where_they_are(method):
    """One NaN / inf entry: zero update there, every other update as with a zero gradient there
    (the weight-space layer and the per-tensor statistics used to spread it everywhere)."""
    shapes, spec = mlp_space()
    params = random_tree(0, shapes, 0.5)
    lopt = learned_opt.learned_optimizer(method, params, spec)
    meta = lopt.init(jax.random.key(1)) | {"beta": jnp.float32(1.0)}
    update = jax.jit(lopt.update)
    state = warm_state(update, lopt, meta, params, 3)
    grads = random_tree(4, shapes)
    bad = jax.tree.map(lambda g: g, grads)
    bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[1, 2].set(jnp.nan)
    bad["Dense_1"]["bias"] = bad["Dense_1"]["bias"].at[0].set(-jnp.inf)
    zeroed = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), bad)
    got, got_state = update(meta, state, bad, params)
    want, want_state = update(meta, state, zeroed, params)
    assert float(got["Dense_0"]["kernel"][1, 2]) == 0.0 and float(got["Dense_1"]["bias"][0]) == 0
    mask = jax.tree.map(jnp.isfinite, bad)
    assert_trees_close(got, jax.tree.map(lambda u, ok: jnp.where(ok, u, 0), want, mask),
                       rtol=1e-6, atol=1e-9)
    assert_trees_close(got_state.momentum, want_state.momentum, rtol=0, atol=0)


def test_progress_needs_num_steps(tmp_path):
    shapes, spec = mlp_space()
    params = random_tree(0, shapes)
    lopt = learned_opt.learned_optimizer("unf", params, spec, progress_centres=(0.5,))
    meta = lopt.init(jax.random.key(0))
    with pytest.raises(ValueError, match="num_steps"):
        lopt.as_optax(meta)
    for zero in (0, np.int32(0), jnp.asarray(0)):  # numpy and jax zeros used to pass
        with pytest.raises(ValueError, match="num_steps must be a number >= 1, got"):
            lopt.as_optax(meta, num_steps=zero)
    with pytest.raises(ValueError, match="training progress"):
        lopt.update(meta, lopt.init_state(meta, params), params, params)
    path = learned_opt.save(tmp_path / "opt", lopt, meta)
    with pytest.raises(ValueError, match="load_optax\\(path, num_steps="):
        learned_opt.load_optax(path)
    tx = learned_opt.load_optax(path, num_steps=100)
    updates, _ = tx.update(params, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    # Optimizers without progress ignore num_steps.
    plain = learned_opt.learned_optimizer("sgdm", params)
    plain.as_optax(plain.init(jax.random.key(0)), num_steps=100)
    with pytest.raises(ValueError, match="progress_centres must be finite"):
        learned_opt.learned_optimizer("sgdm", params, progress_centres=(float("nan"),))


def test_tangent_network_term_is_the_projection_orthogonal_to_the_weights():
    # network_tangent: net term = f - (<f, W> / <W, W>) W per tensor, f the untangented output.
    shapes, spec = mlp_space()
    params = random_tree(0, shapes, 0.5)
    grads = random_tree(1, shapes, 0.3)
    nets = {}
    for tangent in (False, True):
        lopt = learned_opt.learned_optimizer("unf", params, spec, network_tangent=tangent)
        meta = lopt.init(jax.random.key(2)) | {"beta": jnp.float32(1.0)}
        updates, _ = jax.jit(lopt.update)(meta, lopt.init_state(meta, params), grads, params)
        alpha = float(lopt.nominal(meta)["alpha"])
        nets[tangent] = jax.tree.map(lambda u, g: -np.asarray(u) / alpha - np.asarray(g),
                                     updates, grads)
    for f, t, w in zip(jax.tree.leaves(nets[False]), jax.tree.leaves(nets[True]),
                       jax.tree.leaves(params), strict=True):
        w = np.asarray(w, np.float64)
        want = f - np.vdot(f, w) / np.vdot(w, w) * w
        np.testing.assert_allclose(t, want, rtol=1e-3, atol=1e-5)
        assert abs(np.vdot(t, w)) < 1e-4 * np.linalg.norm(t) * np.linalg.norm(w)
        assert abs(np.vdot(f, w)) > 1e-3 * np.linalg.norm(f) * np.linalg.norm(w)  # it did act


def test_adam_features_against_brute_force():
    # adam_features: v <- 0.999 v + 0.001 g^2 kept as the last channel of feature_momenta;
    # f's inputs gain m_d / (sqrt(v) + 1e-8) per decay, each with unit RMS over the tensor.
    shapes, spec = mlp_space()
    params = random_tree(0, shapes, 0.5)
    decays = (0.5, 0.9)
    lopt = learned_opt.learned_optimizer("unf", params, spec, adam_features=True,
                                         clip_features=False, momentum_decays=decays)
    assert lopt.config.num_features == 2 + 2 * len(decays) + len(lopt.config.step_timescales)
    meta = lopt.init(jax.random.key(1))
    state = lopt.init_state(meta, params)
    grad_seq = [random_tree(10 + i, shapes, 0.1 * (i + 1)) for i in range(3)]
    for grads in grad_seq[:-1]:
        _, state = lopt.update(meta, state, grads, params)
    fm, x = lopt._state_features(state.feature_momenta, grad_seq[-1], params)
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]  # noqa: E731
    for w, fm_leaf, x_leaf, *gs in zip(leaves(params), leaves(fm), leaves(x),
                                       *map(leaves, grad_seq), strict=True):
        v = np.zeros_like(gs[0])
        m = np.zeros(gs[0].shape + (len(decays),))
        for g in gs:
            v = 0.999 * v + 0.001 * g ** 2
            m = np.asarray(decays) * m + (1 - np.asarray(decays)) * g[..., None]
        np.testing.assert_allclose(fm_leaf[..., -1], v, rtol=1e-5)
        np.testing.assert_allclose(fm_leaf[..., :-1], m, rtol=1e-5, atol=1e-9)
        ratio = m / (np.sqrt(v)[..., None] + 1e-8)
        rms = np.sqrt(np.mean(ratio ** 2, axis=tuple(range(ratio.ndim - 1))))
        np.testing.assert_allclose(x_leaf[..., 2 + len(decays):], ratio / rms, rtol=1e-4)
        # The weight channel: not clipped (clip_features=False), unit RMS.
        np.testing.assert_allclose(x_leaf[..., 0], w / np.sqrt(np.mean(w ** 2)), rtol=1e-4)

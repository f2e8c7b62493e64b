"""Tests of learned-optimizer checkpoints: round trip, other sizes, refusals, corruption."""

import hashlib
import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_optimizers import mlp_space, random_tree, rnn_space

import learned_opt
from learned_opt import checkpoint
from learned_opt.checkpoint import JSON_FILE, META_FILE, CheckpointError
from learned_opt.spec import PermSpecError


def _saved(tmp_path, name="unf", hidden=5):
    shapes, spec = mlp_space(hidden=hidden)
    params = random_tree(0, shapes)
    lopt = learned_opt.learned_optimizer(name, params, spec)
    meta = lopt.init(jax.random.key(1))
    # Non-default values everywhere, so that a load that silently re-initialised would show.
    meta = jax.tree.map(jnp.add, meta, random_tree(2, jax.tree.map(jnp.shape, meta), 0.1))
    path = learned_opt.save(tmp_path / "opt", lopt, meta)
    return path, lopt, meta, params, shapes


@pytest.mark.parametrize("name", ["unf", "sgdm"])
def test_round_trip_gives_bit_identical_updates(tmp_path, name):
    path, lopt, meta, params, shapes = _saved(tmp_path, name)
    lopt2, meta2 = learned_opt.load(path)
    assert lopt2.name == name and lopt2.config == lopt.config
    assert lopt2.weight_space == lopt.weight_space
    for a, b in zip(jax.tree.leaves(meta), jax.tree.leaves(meta2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    grads = random_tree(3, shapes)
    outs = []
    for lo, me in ((lopt, meta), (lopt2, meta2)):
        update = jax.jit(lo.update)
        state = lo.init_state(me, params)
        p = params
        for _ in range(3):
            u, state = update(me, state, grads, p)
            p = optax.apply_updates(p, u)
        outs.append(p)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_header_contents(tmp_path):
    path, lopt, meta, _, _ = _saved(tmp_path)
    with open(os.path.join(path, JSON_FILE)) as f:
        header = json.load(f)
    assert header["name"] == "unf"
    assert header["config"]["init_alpha"] == 0.1
    assert header["num_meta_params"] == lopt.num_meta_params()
    leaf = header["weight_space"][0]
    assert leaf == {"keys": ["Dense_0", "bias"], "shape": [5], "labels": ["h"]}
    assert header["library_version"]


def test_load_optax_other_sizes_and_other_structures(tmp_path):
    path, _, _, _, _ = _saved(tmp_path, hidden=5)
    tx = learned_opt.load_optax(path)
    shapes, _ = mlp_space(hidden=12)
    params = random_tree(4, shapes)

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new, _ = step(params, tx.init(params), random_tree(5, shapes))
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, params)
    other, _ = rnn_space()
    with pytest.raises(PermSpecError, match="leaf 0: expected Dense_0/bias, got b"):
        tx.init(random_tree(6, other))


def test_missing_and_partial(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        learned_opt.load(tmp_path / "nothing")
    path, *_ = _saved(tmp_path, "sgdm")
    os.remove(os.path.join(path, META_FILE))
    with pytest.raises(CheckpointError, match="partial checkpoint.*msgpack is missing"):
        learned_opt.load(path)
    os.remove(os.path.join(path, JSON_FILE))
    with pytest.raises(CheckpointError, match="partial checkpoint.*json is missing"):
        learned_opt.load_optax(path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_meta_params(tmp_path, damage):
    path, *_ = _saved(tmp_path, "sgdm")
    mpath = os.path.join(path, META_FILE)
    blob = bytearray(open(mpath, "rb").read())
    blob = blob[: len(blob) // 2] if damage == "truncate" else (
        blob[:-3] + bytes([blob[-3] ^ 0xFF]) + blob[-2:])
    open(mpath, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupted checkpoint.*SHA-256"):
        learned_opt.load(path)


def test_corrupted_header(tmp_path):
    path, *_ = _saved(tmp_path, "sgdm")
    jpath = os.path.join(path, JSON_FILE)
    text = open(jpath).read()
    open(jpath, "w").write(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        learned_opt.load(path)
    header = json.loads(text)
    del header["weight_space"]
    open(jpath, "w").write(json.dumps(header))
    with pytest.raises(CheckpointError, match="weight_space"):
        learned_opt.load(path)


def test_edited_header_config_is_refused(tmp_path):
    # The config (e.g. momentum_form) changes what the meta-parameters mean: it is checksummed.
    path, *_ = _saved(tmp_path, "sgdm")
    jpath = os.path.join(path, JSON_FILE)
    header = json.load(open(jpath))
    header["config"]["momentum_form"] = "average"
    json.dump(header, open(jpath, "w"))
    with pytest.raises(CheckpointError, match="edited or damaged"):
        learned_opt.load(path)
    del header["header_sha256"]  # a header written before the checksum existed still loads
    header["config"]["momentum_form"] = "sum"
    json.dump(header, open(jpath, "w"))
    assert learned_opt.load(path)[0].config.momentum_form == "sum"


def test_meta_params_that_do_not_fit(tmp_path):
    path, lopt, meta, _, _ = _saved(tmp_path)
    # A consistent checkpoint (checksum updated) whose network has the wrong shapes.
    bad = jax.tree.map(np.asarray, meta)
    first = sorted(bad["net"])[0]
    bad["net"][first] = jax.tree.map(lambda x: np.zeros(x.shape + (2,), np.float32),
                                     bad["net"][first])
    blob = flax.serialization.msgpack_serialize(bad)
    open(os.path.join(path, META_FILE), "wb").write(blob)
    jpath = os.path.join(path, JSON_FILE)
    header = json.load(open(jpath))
    header["meta_params_sha256"] = hashlib.sha256(blob).hexdigest()
    header["header_sha256"] = checkpoint._header_sha256(header)
    json.dump(header, open(jpath, "w"))
    with pytest.raises(CheckpointError, match=f"net/{first}.* has shape"):
        learned_opt.load(path)
    with pytest.raises(CheckpointError, match="missing meta-parameter log_alpha"):
        learned_opt.save(tmp_path / "x", lopt, {k: v for k, v in meta.items() if k != "log_alpha"})


def test_non_finite_meta_params_are_not_saved(tmp_path):
    _, lopt, meta, _, _ = _saved(tmp_path)
    bad = dict(meta, log_alpha=jnp.float32(jnp.nan))
    with pytest.raises(CheckpointError, match="leaf log_alpha holds NaN or inf"):
        learned_opt.save(tmp_path / "nan", lopt, bad)
    assert not (tmp_path / "nan").exists()


def test_shipped_names_win_over_folders_and_damaged_copies_are_named(tmp_path, monkeypatch):
    name = learned_opt.list_pretrained()[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()  # an unrelated folder with the shipped optimizer's name
    assert checkpoint.resolve(name) == os.path.join(checkpoint.PRETRAINED_DIR, name)
    assert checkpoint.resolve(f".{os.sep}{name}") == f".{os.sep}{name}"
    fake = tmp_path / "pkg"
    (fake / "broken").mkdir(parents=True)  # a package copy that lost its files
    monkeypatch.setattr(checkpoint, "PRETRAINED_DIR", str(fake))
    assert learned_opt.list_pretrained() == ["broken"]
    with pytest.raises(CheckpointError, match="'broken' is damaged.*no optimizer.json"):
        learned_opt.load_optax("broken")


def test_shipped_optimizer_infers_the_spec_in_call_order():
    """Flax numbers layers by creation, the params dict follows the calls: a nested-call MLP has
    Dense_1 (hidden) before Dense_0 (output). Inference must see that order, not a sorted copy."""
    import flax.linen as nn

    class Nested(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.LayerNorm()(nn.Dense(8)(x))))

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.remat(nn.Dense)
            return dense(3)(nn.relu(dense(8)(x)))

    class ConvBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    # BatchNorm's scale and bias must get the convolution's channel label, not (None,).
    bn = ConvBatchNorm().init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))["params"]
    assert learned_opt.infer_perm_spec(bn)["BatchNorm_0"]["scale"] == ("Conv_0",)
    inputs = {Nested: (1, 5), WithNorm: (1, 5), Remat: (1, 5), ConvBatchNorm: (1, 6, 6, 2)}
    for model in (Nested(), WithNorm(), Remat(), ConvBatchNorm()):
        params = model.init(jax.random.key(0), jnp.ones(inputs[type(model)]))["params"]
        for name in learned_opt.list_pretrained():
            tx = learned_opt.load_optax(name, num_steps=10)
            state = tx.init(params)
            updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
            assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates)), name


def test_shipped_optimizer_on_half_precision_and_list_trees():
    tx = learned_opt.load_optax("unf_universal_4tasks", num_steps=10)
    params = {"Dense_0": {"kernel": jnp.ones((4, 16), jnp.bfloat16),
                          "bias": jnp.zeros(16, jnp.bfloat16)},
              "Dense_1": {"kernel": jnp.ones((16, 3), jnp.float16),
                          "bias": jnp.zeros(3, jnp.float16)}}
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.momentum))
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    # A list of arrays has no layer names to infer a spec from: say so (was AttributeError).
    with pytest.raises(PermSpecError, match="parameters held in a list.*pass perm_spec"):
        tx.init([jnp.ones((4, 3)), jnp.zeros(3)])


def test_unsaveable_labels(tmp_path):
    shapes, _ = mlp_space()
    params = random_tree(0, shapes)
    spec = {"Dense_0": {"kernel": (None, 1.5), "bias": (1.5,)},
            "Dense_1": {"kernel": (1.5, None), "bias": (None,)}}
    lopt = learned_opt.learned_optimizer("sgdm", params, spec)
    with pytest.raises(CheckpointError, match="1.5"):
        learned_opt.save(tmp_path / "x", lopt, lopt.init(jax.random.key(0)))

"""Contracts every registered optimizer, shipped optimizer and task keeps (optax's alias_test
style: the registries drive the cases, so a newly registered one is checked without a new test).

Optimizers, as optax transformations on a real task: ``update`` jits, returns updates shaped,
typed and structured as the params, all finite; the new state has the old state's structure,
shapes and dtypes (so it can be carried by ``lax.scan``); 30 steps lower the training loss; the
meta-parameter count is the sum of the leaves' sizes. Scripts: each imports and its
``--help`` parses. Tasks: the permutation spec covers every
parameter leaf with one entry per axis, and the loss at initialisation is a finite scalar.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_opt
import tasks

STEPS = 30


def _structure(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _check_optax_contract(tx, task, params, min_drop):
    batch = task.sample_batch(jax.random.key(1))
    state = tx.init(params)
    grads = jax.grad(task.loss)(params, batch)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert _structure(updates) == _structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert _structure(new_state) == _structure(state)

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(task.loss)(p, batch)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, tx.init(params)), None, length=STEPS)[0][0]

    before, after = float(task.loss(params, batch)), float(task.loss(train(params), batch))
    assert after < before - min_drop, (before, after)


@pytest.mark.parametrize("method", learned_opt.list_optimizers())
def test_every_registered_optimizer_is_an_optax_transformation_that_trains(method, tiny_task):
    params = tiny_task.init(jax.random.key(0))
    lopt = learned_opt.learned_optimizer(method, params, tiny_task.perm_spec)
    meta = lopt.init(jax.random.key(0))
    assert lopt.num_meta_params(meta) == sum(np.size(x) for x in jax.tree.leaves(meta)) > 0
    # Untrained rules are hand-designed at initialisation (SGD-momentum-like or normalised Adam):
    # they must already train.
    _check_optax_contract(lopt.as_optax(meta, num_steps=STEPS), tiny_task, params, 0.05)


@pytest.mark.parametrize("name", learned_opt.list_pretrained())
def test_every_shipped_optimizer_loads_and_trains(name, tiny_task):
    params = tiny_task.init(jax.random.key(0))
    tx = learned_opt.load_optax(name, perm_spec=tiny_task.perm_spec, num_steps=STEPS)
    _check_optax_contract(tx, tiny_task, params, 0.05)


@pytest.mark.parametrize("name", tasks.list_tasks())
def test_every_task_has_a_complete_spec_and_a_finite_initial_loss(name, data_dir):
    task = tasks.get_task(name, data_dir=data_dir)
    params = task.init(jax.random.key(0))
    flat_params, treedef = jax.tree.flatten(params)
    flat_spec = treedef.flatten_up_to(task.perm_spec)
    for p, axes in zip(flat_params, flat_spec, strict=True):
        assert len(axes) == np.ndim(p), (name, np.shape(p), axes)
    assert any(label is not None for axes in flat_spec for label in axes)
    loss = jax.jit(task.loss)(params, task.sample_batch(jax.random.key(1)))
    assert loss.shape == () and bool(jnp.isfinite(loss))


SCRIPTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "scripts").glob("*.py")
                 if "def main(argv" in p.read_text())


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_every_script_imports_and_parses_help(path, capsys):
    """Each entry point imports (its library imports resolve) and its parser builds."""
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out

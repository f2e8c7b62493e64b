"""Tests for the RNN zoo: addition data, the GRU's spec, the zoo builder, STATNN, predictors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt import PermSpecError, check_perm_spec, label_sizes, permute, random_permutations
from learned_opt.statnn import statnn_features
from tasks.zoo import addition, predictors, rnn_zoo

ROOT = Path(__file__).resolve().parents[1]


TINY = rnn_zoo.ZooConfig(num_models=20, hidden=8, digits=1, steps=150, lr_min=1e-3, lr_max=3e-2,
                         batch_sizes=(32,), train_size=500, test_size=100, chunk_size=10, seed=3)


def test_problems_are_correct_sums():
    cfg = addition.AdditionConfig(digits=3, hidden=4)
    data = addition.make_problems(cfg, seed=0, n=300)
    lengths = set()
    for q, a, m in zip(*map(np.asarray, data), strict=True):
        question, answer = addition.decode(q), addition.decode(a)
        assert len(question) == cfg.question_len and question.endswith("=")
        x, y = question.strip()[:-1].split("+")
        lengths.update((len(x), len(y)))
        assert answer.rstrip() == f"{int(x) + int(y)}."
        assert int(m.sum()) == len(answer.rstrip())  # digits and the end token
    assert lengths == {1, 2, 3}  # operands of every length up to `digits`
    again = addition.make_problems(cfg, seed=0, n=300)
    np.testing.assert_array_equal(data.question, again.question)


def _gru_and_inputs(hidden=5):
    cfg = addition.AdditionConfig(digits=1, hidden=hidden)
    params = addition.init_params(cfg, jax.random.key(0))
    data = addition.make_problems(cfg, seed=1, n=16)
    return cfg, params, data


def test_gru_spec_is_a_symmetry_and_wrong_specs_fail():
    cfg, params, data = _gru_and_inputs()
    spec = addition.perm_spec(params)
    apply_fn = lambda p, batch: addition.apply(cfg, p, batch.question, batch.answer)
    assert check_perm_spec(apply_fn, params, spec, data) == {"h": cfg.hidden}

    # The decoder continues the encoder's state: its hidden units cannot be permuted apart.
    split = dict(spec, decoder=jax.tree.map(
        lambda labs: tuple("g" if lab == "h" else lab for lab in labs), spec["decoder"],
        is_leaf=lambda x: isinstance(x, tuple)))
    with pytest.raises(PermSpecError, match="not a symmetry"):
        check_perm_spec(apply_fn, params, split, data)
    # Output logits are tied to the vocabulary: permuting them changes the outputs.
    vocab = dict(spec, out={"kernel": ("h", "v"), "bias": ("v",)})
    with pytest.raises(PermSpecError, match="'v'"):
        check_perm_spec(apply_fn, params, vocab, data)


def test_statnn_features_match_numpy_and_are_permutation_invariant():
    _, params, _ = _gru_and_inputs()
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
                          params)
    spec = addition.perm_spec(params)  # only checked against the params
    feats = np.asarray(jax.jit(lambda p: statnn_features(p, spec))(params))
    leaves = jax.tree.leaves(params)
    assert feats.shape == (7 * len(leaves),)
    for i, x in enumerate(leaves):
        x = np.asarray(x, np.float64).ravel()
        expect = [x.mean(), x.var(), *np.percentile(x, [0, 25, 50, 75, 100])]
        np.testing.assert_allclose(feats[7 * i:7 * i + 7], expect, rtol=1e-5, atol=1e-6)
    # Invariant to any shuffle of the entries of a tensor, so to neuron permutations too.
    shuffled = jax.tree.map(lambda x: jax.random.permutation(jax.random.key(3), x.ravel())
                            .reshape(x.shape), params)
    np.testing.assert_allclose(jax.jit(statnn_features)(shuffled), feats, rtol=1e-6)
    with pytest.raises(PermSpecError, match="out/bias"):
        bad = addition.perm_spec(params)
        del bad["out"]["bias"]
        statnn_features(params, bad)


def test_kendall_tau_of_exact_and_reversed_predictions():
    true = np.random.default_rng(0).uniform(size=50)
    exact = predictors.evaluate_predictions(true, true)
    assert exact["kendall_tau"] == pytest.approx(1.0) and exact["r2"] == pytest.approx(1.0)
    assert predictors.evaluate_predictions(1.0 - true, true)["kendall_tau"] == pytest.approx(-1.0)
    # Any increasing transformation keeps the ranking (tau) but not R^2.
    squashed = predictors.evaluate_predictions(true**3, true)
    assert squashed["kendall_tau"] == pytest.approx(1.0) and squashed["r2"] < 0.95


@pytest.mark.parametrize("method", ["unf", "deepset"])
def test_weight_space_predictor_is_invariant_to_hidden_unit_permutations(method):
    _, params, _ = _gru_and_inputs(hidden=4)
    spec = addition.perm_spec(params)
    pcfg = predictors.PredictConfig(method=method, channels=3, layers=1, head_width=8)
    zoo = jax.tree.map(lambda x: jnp.stack([x, x + 0.3 * jnp.sin(jnp.arange(x.size))
                                            .reshape(x.shape)]), params)
    inputs = predictors.make_inputs(pcfg, zoo, np.arange(2))
    model, apply_fn = predictors.make_predictor(pcfg, spec)
    variables = predictors.init_predictor(pcfg, model, inputs, spec, jax.random.key(0))
    perms = random_permutations(jax.random.key(5), label_sizes(params, spec))
    permuted = jax.vmap(lambda p: permute(p, spec, perms))(jax.tree.map(lambda x: x[..., 0],
                                                                        inputs))
    permuted = jax.tree.map(lambda x: x[..., None], permuted)
    apply_fn = jax.jit(apply_fn)
    out, out_perm = apply_fn(variables, inputs), apply_fn(variables, permuted)
    assert not np.allclose(np.asarray(permuted["encoder"]["hr"]["kernel"]),
                           np.asarray(inputs["encoder"]["hr"]["kernel"]))
    np.testing.assert_allclose(out, out_perm, rtol=1e-4, atol=1e-5)
    assert abs(float(out[0] - out[1])) > 1e-6  # and it does look at the weights


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    # Two workers share the build: the first to finish leaves the other's chunk to it.
    assert rnn_zoo.build(TINY, out, log_every=TINY.steps, worker=1, workers=2) is None
    assert len(list((out / "chunks").glob("*.npz"))) == 1
    zoo = rnn_zoo.build(TINY, out, log_every=TINY.steps, worker=0, workers=2)
    return out, zoo


def test_tiny_zoo_build_reload_and_resume(tiny_zoo):
    out, zoo = tiny_zoo
    success = zoo["success"]
    assert success.shape == (TINY.num_models,)
    assert len(np.unique(success)) > 5 and success.max() - success.min() > 0.2
    assert np.bincount(zoo["split"]).tolist() == [16, 2, 2]
    # Stored weights, reloaded, reproduce the recorded test results on the fixed test set.
    cfg, loaded, params = rnn_zoo.load_zoo(out)
    assert cfg == TINY
    _, test = rnn_zoo.problem_sets(cfg)
    for i in (int(np.argmax(success)), int(np.argmin(success)), 7):
        acc, loss = addition.evaluate(cfg.task, jax.tree.map(lambda x, i=i: x[i], params), test)
        assert float(acc) == pytest.approx(loaded["success"][i], abs=1.5 / cfg.test_size)
        assert float(loss) == pytest.approx(loaded["test_loss"][i], rel=1e-4)
    # Resuming finds every chunk done and trains nothing; another configuration is refused.
    mtimes = sorted(p.stat().st_mtime_ns for p in (out / "chunks").glob("*.npz"))
    rebuilt = rnn_zoo.build(TINY, out)
    assert sorted(p.stat().st_mtime_ns for p in (out / "chunks").glob("*.npz")) == mtimes
    np.testing.assert_array_equal(rebuilt["success"], success)
    with pytest.raises(ValueError, match="steps"):
        rnn_zoo.build(dataclasses.replace(TINY, steps=7), out)


def test_predictor_keeps_an_epoch_when_validation_tau_is_undefined(tiny_zoo):
    # Tied validation labels make Kendall's tau NaN at every epoch: the first epoch is kept
    # (this raised KeyError: 'variables').
    out, zoo = tiny_zoo
    _, _, params = rnn_zoo.load_zoo(out)
    labels = np.array(zoo["success"], np.float32)
    labels[zoo["split"] == 1] = 0.5
    pcfg = predictors.PredictConfig(method="statnn", epochs=2, batch_size=4)
    res = predictors.train_predictor(pcfg, params, labels, zoo["split"],
                                  addition.perm_spec(params), log=lambda s: None)
    assert res["best_epoch"] == 1 and np.isnan(res["val_kendall_tau"])
    assert res["test_pred"].shape == (2,)


def test_predict_cli_prints_json_metrics(tiny_zoo):
    out, zoo = tiny_zoo
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "rnn_zoo.py"), "predict",
                           "--zoo", str(out), "--method", "statnn", "--epochs", "2",
                           "--batch-size", "4"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["method"] == "statnn" and result["num_test"] == 2
    assert -1.0 <= result["kendall_tau"] <= 1.0 and np.isfinite(result["r2"])
    assert Path(result["plot"]).exists()

"""The evaluation engine (meta_train.evaluation): tuning, divergence, seed policy, reports."""

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from learned_opt import hand_designed as hd
from meta_train import evaluation as ev

STEPS = 30


@pytest.fixture(scope="module")
def task():
    return tasks.get_task("mlp_fmnist_tiny")


def test_tuned_choice_is_the_argmin_on_the_tuning_seeds(task):
    grid = (1e-3, 1e-2, 1e-1)
    cand = ev.Candidate(hd.adam, {"lr": grid})
    point, scores = ev.tune(task, cand, [200, 201], STEPS)
    by_hand = [ev.score(ev.train_runs(task, optax.adam(lr), [200, 201], STEPS).losses)
               for lr in grid]
    np.testing.assert_allclose([s["score"] for s in scores], by_hand, rtol=1e-5)
    assert point == {"lr": grid[int(np.argmin(by_hand))]}
    # One compilation per point (Python numbers) chooses the same.
    assert ev.tune(task, cand._replace(trace=False), [200, 201], STEPS)[0] == point
    # The evaluation runs are the chosen optimizer's, on the evaluation seeds.
    res = ev.run_candidate(task, cand, STEPS, [100, 101], [200, 201], log=lambda m: None)
    assert res.hparams == point
    np.testing.assert_array_equal(
        res.runs.losses, ev.train_runs(task, optax.adam(point["lr"]), [100, 101], STEPS).losses)


def test_a_diverging_grid_point_is_never_chosen(task):
    # The point 0.0 would be best (plain Adam at 1e-1) but its run goes NaN at every step.
    def make(bad):
        return optax.chain(optax.adam(0.1), _blow_up_state(bad))

    def _blow_up_state(bad):
        return optax.GradientTransformation(
            lambda p: optax.EmptyState(),
            lambda u, s, p=None: (jax.tree.map(lambda x: x + jnp.where(bad > 0.5, jnp.nan, 0.0),
                                               u), s))

    cand = ev.Candidate(lambda bad, lr: optax.chain(make(bad), optax.scale(lr)),
                        {"bad": (1.0, 0.0), "lr": (1.0, 0.01)})
    point, scores = ev.tune(task, cand, [200], STEPS)
    assert [math.isinf(s["score"]) for s in scores] == [True, True, False, False]
    assert point["bad"] == 0.0
    # A run that diverges only early (finite tail) scores inf too.
    early = np.ones((1, STEPS))
    early[0, 2] = np.nan
    assert ev.score(early) == math.inf and ev.score(np.ones((1, STEPS))) == 1.0
    # Every point diverging: nothing is chosen, nothing is trained, the row says so.
    report = ev.evaluate(task, {"nan": ev.Candidate(make, {"bad": (1.0, 2.0)})}, [STEPS],
                         [100], [200], log=lambda m: None)
    (row,) = report.rows
    assert row["hparams"] is None and "final_train_loss" not in row and not report.runs
    assert "nan" in ev.format_table(report.rows)


def test_ties_go_to_the_first_grid_point(task):
    cand = ev.Candidate(lambda lr, unused: optax.adam(lr), {"lr": (1e-2,), "unused": (3.0, 1.0)})
    point, scores = ev.tune(task, cand, [200], 10)
    assert scores[0]["score"] == scores[1]["score"] and point == {"lr": 1e-2, "unused": 3.0}


def test_seed_policy(task):
    with pytest.raises(ValueError, match="overlap"):
        ev.evaluate(task, {"sgd": optax.sgd(0.1)}, [5], seeds=[100, 200], tune_seeds=[200])
    assert not set(ev.EVAL_SEEDS) & set(ev.TUNE_SEEDS)
    # Same seed: same initialisation and batches whatever the optimizer. With a zero step the
    # loss of step t is the initial network's loss on batch t, which we rebuild from the seed.
    a = ev.train_runs(task, optax.sgd(0.0), [100, 101], 5).losses
    b = ev.train_runs(task, optax.adam(0.0), [100, 101], 5).losses
    c = ev.train_runs(task, optax.adam(0.1), [100, 101], 5).losses
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 0], c[:, 0])  # before the first update
    k_init, k_data = jax.random.split(ev.seed_key(101))
    params = task.init(k_init)
    by_hand = [task.loss(params, task.sample_batch(jax.random.fold_in(k_data, t), "train"))
               for t in range(5)]
    np.testing.assert_allclose(a[1], by_hand, rtol=1e-6)
    assert len(set(a[:, 0].tolist())) == 2  # different seeds, different networks


def test_report_rows_files_and_paired_comparison(task, tmp_path):
    # A learned-optimizer-shaped candidate: direction, then a scheduled learning rate to tune.
    def scheduled(lr, steps):
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                           optax.scale_by_learning_rate(
                               lambda t: lr * optax.cosine_decay_schedule(1.0, steps)(t)))

    candidates = {
        "adamw_cosine": ev.Candidate(hd.adamw_cosine, {"lr": (1e-2, 1e-1), "wd": (0.0, 1e-2)}),
        "scheduled": ev.Candidate(scheduled, {"lr": (1e-2, 1e-1)}),
        "adam_default": ev.BASELINES["adam_default"],
        "sgd": optax.sgd(0.1),
    }
    report = ev.evaluate(task, candidates, [10, 20], [100, 101], [200], out_dir=tmp_path,
                         title="tiny", log=lambda m: None)
    assert [(r["horizon"], r["optimizer"]) for r in report.rows] == [
        (t, n) for t in (10, 20) for n in candidates]
    row = report.rows[0]
    assert set(row["hparams"]) == {"lr", "wd"} and len(row["grid_scores"]) == 4
    assert report.rows[2]["hparams"] == {} and report.rows[2]["grid_scores"] == []
    for r in report.rows:
        assert np.isfinite(r["final_train_loss"]) and np.isfinite(r["final_test_loss_se"])
        assert 0 <= r["test_accuracy"] <= 1 and r["diverged_seeds"] == 0
    d = report.paired("sgd", "adam_default", 20)
    diff = report.runs[20, "sgd"].final_train - report.runs[20, "adam_default"].final_train
    assert d["mean"] == pytest.approx(diff.mean()) and d["verdict"] in (
        "better than", "WORSE than", "within noise of")
    assert "paired difference" in ev.paired_text(report, "sgd", "adam_default", 20)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["info"]["tune_seeds"] == [200] and len(summary["rows"]) == 8
    assert len(list(csv.DictReader((tmp_path / "summary.csv").open()))) == 8
    assert set(json.loads((tmp_path / "curves.json").read_text())) == {"T=10", "T=20"}
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_baselines_and_grids():
    assert hd.ADAM_LR_GRID == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # experiment 1's grids
    assert hd.SGDM_LR_GRID == (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    for cand in ev.BASELINES.values():
        for values in cand.grid.values():
            assert list(values) == sorted(values)
        for lr in cand.grid.get("lr", ()):
            assert lr in hd.LR_GRID  # one learning-rate grid
    schedule = hd.warmup_cosine(1.0, 100)
    assert [float(schedule(t)) for t in (0, 5, 100)] == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 2.0)}
    u, _ = hd.sgdm(0.1).update(grads, hd.sgdm(0.1).init(params))
    np.testing.assert_allclose(u["w"], -0.2)
    tx = ev.build(ev.BASELINES["adamw_cosine"], None, 100, lr=1e-2, wd=0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(u["w"]))


def test_evaluate_script_takes_every_task_of_a_multi_task_run(tmp_path):
    """scripts/evaluate.py on a run of several tasks evaluates each (it raised KeyError)."""
    import importlib.util
    from pathlib import Path

    import learned_opt
    from meta_train import MetaTrainConfig

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    (run / "optimizer").mkdir(parents=True)
    params = tasks.get_task("mlp_fmnist_tiny").init(jax.random.key(0))
    lopt = learned_opt.learned_optimizer("direction_elementwise", params)
    learned_opt.save(run / "optimizer", lopt, lopt.init(jax.random.key(0)))
    config = MetaTrainConfig(task="mlp_fmnist_tiny,cnn_cifar10_tiny", population=4,
                             optimizer="direction_elementwise", truncation=5, horizon=10)
    (run / "config.json").write_text(config.to_json())
    spec = importlib.util.spec_from_file_location("evaluate_script",
                                                  root / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--run", str(run), "--seeds", "2", "--tune-seeds", "1", "--baselines",
                        "adam_default", "--wandb", "disabled", "--steps", "5"]) == 0
    for name in ("mlp_fmnist_tiny", "cnn_cifar10_tiny"):
        rows = json.loads((run / "eval" / name / "summary.json").read_text())["rows"]
        assert {r["optimizer"] for r in rows} == {"direction_elementwise (meta-trained)",
                                                  "adam_default"}
        assert all(math.isfinite(r["final_train_loss"]) for r in rows)


def test_heldout_candidates_are_cached_per_candidate_and_reused(tmp_path):
    import learned_opt
    from meta_train.experiments import heldout

    params = tasks.get_task("mlp_fmnist_tiny").init(jax.random.key(0))
    lopt = learned_opt.learned_optimizer("direction_unf", params)
    learned_opt.save(tmp_path / "opt", lopt, lopt.init(jax.random.key(0)))
    cands = heldout.direction_candidates({"mine": str(tmp_path / "opt")}, ["mine"])
    assert set(cands) == {"mine", "mine (lr tuned)", "normalised Adam (untrained rule)"}
    with pytest.raises(ValueError, match="lr_tuned names \\['other'\\]"):
        heldout.direction_candidates({"mine": str(tmp_path / "opt")}, ["other"])
    cands = {"mine": cands["mine"], "adam_default": ev.BASELINES["adam_default"]}
    rows = heldout.evaluate_candidates(cands, ["mlp_fmnist_tiny"], [5], tmp_path / "out",
                                       [100, 101], [200], log=lambda m: None)
    assert [r["optimizer"] for r in rows] == ["mine", "adam_default"]
    assert all(math.isfinite(r["final_train_loss"]) for r in rows)
    # A rerun reads the files instead of training again (a marker written into one shows it).
    path = tmp_path / "out" / "mlp_fmnist_tiny" / "T=5" / "adam_default.json"
    data = json.loads(path.read_text())
    data["row"]["final_train_loss"] = -1.0
    path.write_text(json.dumps(data))
    again = heldout.evaluate_candidates(cands, ["mlp_fmnist_tiny"], [5], tmp_path / "out",
                                        [100, 101], [200], log=lambda m: None)
    assert again[1]["final_train_loss"] == -1.0 and again[0] == rows[0]
    with pytest.raises(KeyError, match="unknown architecture 'nope'"):
        heldout.get_architecture("nope")

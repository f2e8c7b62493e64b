"""Meta-training: estimators lower the meta-loss, resume is exact, the guard holds, sharding is
transparent, the CLI writes a loadable run and rejects bad flags at once.

Tiny configurations (mlp_fmnist_tiny, sgdm: 2 meta-parameters) keep compile times low.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_opt
from meta_train import ConfigError, MetaTrainConfig, meta_train, runs
from meta_train import train as mt
from meta_train.cli import main as cli_main
from meta_train.inner import resolve_member_loop
from meta_train.tracking import MetricsLogger, read_metrics

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("LOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("LOPT_DATA_DIR", DATA)

TINY = dict(task="mlp_fmnist_tiny", optimizer="sgdm", population=4, truncation=5, horizon=20,
            outer_lr=0.1, std=0.05, wandb="disabled", shard=False, loss_cap=8.0)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _run(setup, state, start, stop):
    history = []
    for t in range(start, stop):
        state, metrics = setup.step_fn(state, np.int32(t))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return state, history


@pytest.fixture(scope="module")
def pes_setup():
    # One build (and one compilation) shared by the PES tests; sgdm has 2 meta-parameters.
    return mt.build(MetaTrainConfig(**TINY, optimizer_args={"init_alpha": 0.01}))


def _check_meta_loss_falls(setup, steps):
    # sgdm starts at a 10x too small step size: the meta-gradient must raise alpha, and the
    # meta-loss over the last horizon's worth of outer steps must be clearly below the first.
    state, history = _run(setup, mt.init_state(setup), 0, steps)
    per_horizon = setup.config.horizon // setup.config.truncation
    per_horizon = per_horizon if setup.config.estimator == "pes" else 1
    losses = np.array([h["meta_loss"] for h in history])
    first, last = losses[:per_horizon].mean(), losses[-per_horizon:].mean()
    meta = setup.estimator.mean(state)
    assert np.all(np.isfinite(_flat(meta)))
    # 0.05: on one installation the PES run (200 steps) ends 0.086 lower, on another > 0.1.
    assert last < first - 0.05, (first, last)
    assert setup.lopt.nominal(meta)["alpha"] > 0.03
    assert sum(h["nonfinite"] for h in history) == 0


def test_pes_lowers_meta_loss(pes_setup):
    _check_meta_loss_falls(pes_setup, 200)


def test_es_lowers_meta_loss():
    cfg = MetaTrainConfig(**TINY, estimator="es", optimizer_args={"init_alpha": 0.01})
    _check_meta_loss_falls(mt.build(cfg), 50)


def test_pes_staggers_and_resets_pairs(pes_setup):
    setup = pes_setup
    state, _ = _run(setup, mt.init_state(setup), 0, 1)
    inner = jax.device_get(state.inner)
    half = setup.config.population // 2
    # Antithetic partners share their episode (same init, same batches); pairs are staggered.
    np.testing.assert_array_equal(inner.length[:half], inner.length[half:])
    np.testing.assert_array_equal(inner.data_key[:half], inner.data_key[half:])
    assert len(set(inner.length[:half].tolist())) == half
    # A pair whose episode ended restarts with a fresh init and zeroed perturbation history.
    state, _ = _run(setup, state, 1, 2)
    done = jax.device_get(state.inner.step) >= jax.device_get(state.inner.length)
    assert done.any()
    state2, _ = _run(setup, state, 2, 3)
    steps2 = jax.device_get(state2.inner.step)
    assert np.all(steps2[done] == setup.config.truncation)


@pytest.mark.parametrize("alpha,counter", [(1e4, "capped"), (1e30, "nonfinite")])
def test_divergence_guard_counts_and_keeps_meta_params_finite(pes_setup, alpha, counter):
    # alpha = 1e4 makes every inner loss explode (finite, capped); 1e30 makes it NaN/inf.
    setup = pes_setup
    meta = dict(setup.init_meta_params, log_alpha=jnp.log(jnp.float32(alpha)))
    state, history = _run(setup, mt.init_state(setup, meta), 0, 4)
    for h in history:
        assert np.isfinite(h["meta_loss"]) and h["meta_loss"] <= setup.config.loss_cap + 1e-6
        # (Steps where every member sits at the cap carry no information and are skipped:
        # test_no_update_when_every_member_is_at_the_loss_cap.)
    assert sum(h[counter] for h in history) > 0
    assert np.all(np.isfinite(_flat(setup.estimator.mean(state))))
    assert np.all(np.isfinite(np.asarray(state.es.pert_accum)))


def test_outer_step_compiles_once():
    # A second call with new state and step must reuse the compiled program (a Python scalar,
    # a weak type or a dataset constant would each force a recompilation).
    setup = mt.build(MetaTrainConfig(**TINY, outer_steps=3))
    _run(setup, mt.init_state(setup), 0, 3)
    assert setup.step_fn.compiled_versions() == 1


def test_no_update_when_every_member_is_at_the_loss_cap():
    # A cap below every loss: all fitnesses tie, the estimate carries no information, and the
    # meta-parameters must not move (rounding noise through Adam moved alpha 0.1 -> 0.1002).
    setup = mt.build(MetaTrainConfig(**(TINY | dict(loss_cap=1e-3)), outer_steps=4))
    state, history = _run(setup, mt.init_state(setup, setup.init_meta_params), 0, 4)
    assert all(h["update_skipped"] == 1 and h["capped"] > 0 for h in history)
    np.testing.assert_array_equal(_flat(setup.estimator.mean(state)),
                                  _flat(setup.init_meta_params))


def test_interrupted_and_resumed_equals_uninterrupted(pes_setup, tmp_path, monkeypatch):
    cfg = pes_setup.config.replace(outer_steps=6, checkpoint_every=100)
    full = meta_train(cfg.replace(out=str(tmp_path / "full")), progress=False, setup=pes_setup)

    # Ctrl-C while logging step 3: the run saves a checkpoint of what it completed and re-raises.
    real_log = MetricsLogger.log

    interrupted = []

    def interrupting_log(self, step, metrics):
        if step == 3 and not interrupted:
            interrupted.append(step)
            raise KeyboardInterrupt
        real_log(self, step, metrics)

    monkeypatch.setattr(MetricsLogger, "log", interrupting_log)
    part = cfg.replace(out=str(tmp_path / "part"))
    with pytest.raises(KeyboardInterrupt):
        meta_train(part, progress=False, setup=pes_setup)
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    saved = mt.checkpoint.latest(tmp_path / "part")["step"]
    assert 3 <= saved < 6
    with pytest.raises(ConfigError, match="already holds a run"):
        meta_train(part, progress=False, setup=pes_setup)
    with pytest.raises(ConfigError, match="std"):
        meta_train(part.replace(resume=True, std=0.1), progress=False, given={"std"})
    resumed = meta_train(part.replace(resume=True), progress=False, setup=pes_setup)
    assert resumed.steps_done == 6
    np.testing.assert_array_equal(_flat(resumed.meta_params), _flat(full.meta_params))
    steps = [row["step"] for row in read_metrics(tmp_path / "part")]
    assert steps == list(range(6))


def test_user_callbacks_see_every_step_state_and_the_end(pes_setup, tmp_path):
    from meta_train import Callback

    class Record(Callback):
        def __init__(self):
            self.events = []

        def on_step(self, t, row):
            self.events.append(("step", t, round(row["meta_loss"], 6)))

        def on_state(self, done, state):
            self.events.append(("state", done))

        def on_end(self, done, state, interrupted):
            self.events.append(("end", done, interrupted))

    cb = Record()
    cfg = pes_setup.config.replace(outer_steps=3, out=str(tmp_path / "run"))
    result = meta_train(cfg, progress=False, setup=pes_setup, callbacks=[cb])
    assert [e[:2] for e in cb.events if e[0] == "step"] == [("step", 0), ("step", 1),
                                                            ("step", 2)]
    assert [e for e in cb.events if e[0] == "state"] == [("state", 1), ("state", 2),
                                                         ("state", 3)]
    assert cb.events[-1] == ("end", 3, False)
    logged = [round(r["meta_loss"], 6) for r in read_metrics(tmp_path / "run")]
    assert [e[2] for e in cb.events if e[0] == "step"] == logged
    assert [r["step"] for r in result.history] == [0, 1, 2]


def test_exported_run_resumes_elsewhere_bit_exactly(pes_setup, tmp_path):
    # What a run longer than one session commits (scripts/sync_run.py), laid out on a "fresh
    # machine" (another directory) and resumed, equals the uninterrupted run.
    from meta_train.checkpoint import export_run, import_run

    cfg = pes_setup.config.replace(outer_steps=6, checkpoint_every=2, snapshot_every=2)
    full = meta_train(cfg.replace(out=str(tmp_path / "full")), progress=False, setup=pes_setup)
    part = cfg.replace(out=str(tmp_path / "part"), outer_steps=4)
    meta_train(part, progress=False, setup=pes_setup)
    assert export_run(tmp_path / "part", tmp_path / "exported") == 4
    assert len(list((tmp_path / "exported" / "checkpoints").glob("*.msgpack"))) == 1
    assert (tmp_path / "exported" / "snapshots" / "step_0000004").is_dir()
    chunk = tmp_path / "exported" / "metrics" / "rows_00000000.jsonl.gz"
    before = chunk.read_bytes()
    export_run(tmp_path / "part", tmp_path / "exported")  # unchanged log: identical bytes
    assert chunk.read_bytes() == before
    with pytest.raises(FileExistsError, match="already holds a run"):
        import_run(tmp_path / "exported", tmp_path / "part")
    assert import_run(tmp_path / "exported", tmp_path / "elsewhere") == 4
    moved = cfg.replace(out=str(tmp_path / "elsewhere"), resume=True)
    resumed = meta_train(moved, progress=False, setup=pes_setup)
    np.testing.assert_array_equal(_flat(resumed.meta_params), _flat(full.meta_params))
    assert [row["step"] for row in read_metrics(tmp_path / "elsewhere")] == list(range(6))


def compare_runs(setups, steps=4):
    """Run each setup from its initial state; every pair must agree.

    Each member's inner run must match to float rounding. The ES mean is compared with a looser
    tolerance: its gradient is a difference of antithetic fitnesses, which amplifies 1-ulp
    differences in losses reduced in another order (measured: ~1e-4 after 4 steps).
    Returns the final states.
    """
    runs = [_run(setup, mt.init_state(setup), 0, steps) for setup in setups]
    (s0, h0), rest = runs[0], runs[1:]
    for s1, h1 in rest:
        for a, b in zip(jax.tree.leaves(s0.inner), jax.tree.leaves(s1.inner), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([h["meta_loss"] for h in h0], [h["meta_loss"] for h in h1],
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(s0.es.mean), np.asarray(s1.es.mean), rtol=1e-3,
                                   atol=1e-4)
    return [state for state, _ in runs]


def compare_sharded(config, steps=4, unsharded=None):
    """Run ``config`` unsharded and sharded over 2 devices; compare states and metrics."""
    assert jax.device_count() >= 2, jax.devices()
    setups = [unsharded if unsharded is not None else mt.build(config.replace(shard=False)),
              mt.build(config.replace(shard=True))]
    states = compare_runs(setups, steps)
    devices = [len(jax.tree.leaves(s.inner.params)[0].sharding.device_set) for s in states]
    assert devices == [1, 2]


def test_member_loops_agree():
    # The update network (unf) is where batched and one-at-a-time products differ most; under
    # `make test` the population is sharded, so `map` runs inside shard_map.
    config = MetaTrainConfig(**TINY | dict(optimizer="unf", shard=jax.device_count() >= 2))
    setups = [mt.build(config.replace(member_loop=loop)) for loop in ("vmap", "map")]
    assert [s.estimator.problem.member_loop for s in setups] == ["vmap", "map"]
    compare_runs(setups, steps=3)
    assert resolve_member_loop("auto") == ("map" if jax.default_backend() == "cpu" else "vmap")
    with pytest.raises(ConfigError, match="member_loop must be one of"):
        config.replace(member_loop="pmap")


def test_evaluation_member_loops_agree():
    import optax

    import tasks
    from meta_train import evaluation

    task = tasks.get_task("mlp_fmnist_tiny")
    runs = {loop: evaluation.train_runs(task, optax.adam(1e-2), [100, 101], 20, member_loop=loop)
            for loop in ("vmap", "map")}
    for a, b in zip(runs["vmap"], runs["map"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    adam = evaluation.Candidate(optax.adam, {"learning_rate": (1e-3, 1e-1)})
    tuned = {loop: evaluation.tune(task, adam, [200], 20, member_loop=loop)
             for loop in ("vmap", "map")}
    assert tuned["vmap"][0] == tuned["map"][0]
    np.testing.assert_allclose([p["score"] for p in tuned["vmap"][1]],
                               [p["score"] for p in tuned["map"][1]], rtol=1e-5)


def test_sharded_equals_unsharded(pes_setup):
    config = pes_setup.config
    if jax.device_count() >= 2:  # `make test` sets XLA_FLAGS for 2 host devices
        compare_sharded(config, unsharded=pes_setup)
        return
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            "import test_meta_train as t; from meta_train import MetaTrainConfig; "
            f"t.compare_sharded(MetaTrainConfig.from_json({config.to_json()!r})); print('ok')")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(ROOT), LOPT_DATA_DIR=DATA)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_cli_writes_run_dir_metrics_checkpoint_and_optimizer(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, LOPT_DATA_DIR=DATA, WANDB_SILENT="true")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "meta_train", "--task", "mlp_fmnist_tiny",
           "--optimizer", "sgdm", "--population", "4", "--truncation", "5", "--horizon", "10",
           "--outer-steps", "5", "--checkpoint-every", "2", "--wandb", "offline",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"outer step compiled in \d+\.\d s", proc.stdout + proc.stderr)
    config = json.loads((out / "config.json").read_text())
    assert list(config) == ["task", "optimizer", "estimator", "run"]
    assert config["estimator"]["population"] == 4 and config["estimator"]["loss_cap"] > 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(5))
    for key in ("meta_loss", "alpha", "beta", "decay", "grad_norm", "nonfinite",
                "inner_steps_per_s"):
        assert key in rows[-1]
    assert mt.checkpoint.latest(out)["step"] == 5
    assert list((out / "wandb").glob("offline-run-*"))
    # The final optimizer is an ordinary optax optimizer.
    import tasks

    task = tasks.get_task("mlp_fmnist_tiny")
    params = task.init(jax.random.PRNGKey(0))
    tx = learned_opt.load_optax(out / "optimizer")
    grads = jax.grad(task.loss)(params, task.sample_batch(jax.random.PRNGKey(1)))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("flags,message", [
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["--optimizer", "no_such_opt"], "unknown optimizer 'no_such_opt'"),
    (["--task", "rnn_lm_tiny", "--optimizer", "nfn"], "cannot be used with task 'rnn_lm_tiny'"),
    (["--population", "7"], "population must be even"),
    (["--horizon", "30", "--truncation", "20"], "multiple of truncation"),
    (["--std", "inf"], "std must be a finite positive number"),
    (["--loss-cap", "nan"], "loss_cap must be a finite number"),
    (["--outer-lr", "-1"], "outer_lr must be a finite positive number"),
    (["--min-horizon", "5000"], "min_horizon"),
])
def test_bad_flags_fail_at_once(flags, message, tmp_path, capsys):
    argv = flags + ["--out", str(tmp_path / "r"), "--wandb", "disabled"]
    try:
        code = cli_main(argv)
    except SystemExit as e:  # errors found while parsing exit through argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_task_optimizer_defaults_apply_unless_the_user_sets_them():
    import tasks

    task = tasks.get_task("rnn_lm")
    lopt = mt.build_optimizer(MetaTrainConfig(task="rnn_lm", optimizer="sgdm"), task)
    assert lopt.config.init_alpha == 0.03  # 0.1 diverges on this task (tasks/registry.py)
    mine = MetaTrainConfig(task="rnn_lm", optimizer="sgdm", optimizer_args={"init_alpha": 0.1})
    assert mt.build_optimizer(mine, task).config.init_alpha == 0.1
    assert tasks.optimizer_defaults("mlp_fmnist") == {}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.optimizer_defaults("nope")


def test_population_not_divisible_by_devices_fails():
    with pytest.raises(ConfigError, match=r"divisible by the number of devices"):
        mt.make_mesh(6, devices=[object()] * 4)


def test_data_dir_flag_points_the_loaders_at_a_directory(tmp_path, monkeypatch):
    from meta_train.cli import parse_args

    monkeypatch.setenv("LOPT_DATA_DIR", "/before")  # restored (or removed) after the test
    config, given = parse_args(["--data-dir", str(tmp_path), "--task", "mlp_fmnist_tiny"])
    assert os.environ["LOPT_DATA_DIR"] == str(tmp_path.resolve())
    assert "data_dir" not in given and config.task == "mlp_fmnist_tiny"

def test_help_lists_names_and_a_missing_data_dir_exits_2(tmp_path, capsys):
    import learned_opt
    import tasks
    from meta_train.cli import make_parser, parse_args

    text = make_parser().format_help().replace("\n", " ")
    assert all(name in text for name in tasks.list_tasks() + learned_opt.list_optimizers())
    with pytest.raises(SystemExit) as e:
        parse_args(["--data-dir", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "no such directory" in capsys.readouterr().err


# ---------------------------------------------------------------- episode lengths


def test_episode_lengths_are_log_uniform_multiples_of_k_shared_by_pairs():
    config = MetaTrainConfig(**(TINY | dict(population=8, horizon=400, truncation=5)),
                             min_horizon=10)
    est = mt.build(config).estimator
    lengths = np.concatenate([np.asarray(est.sample_lengths(jax.random.PRNGKey(i)))
                              for i in range(200)]).reshape(200, 8)
    np.testing.assert_array_equal(lengths[:, :4], lengths[:, 4:])  # antithetic pairs agree
    assert lengths.min() >= 10 and lengths.max() <= 400 and np.all(lengths % 5 == 0)
    # Log-uniform: half the mass below the geometric mean (uniform would put 14% there).
    below = np.mean(lengths[:, :4] < np.sqrt(10 * 400))
    assert 0.4 < below < 0.6, below
    first = np.asarray(est.first_lengths(jax.random.PRNGKey(0)))
    assert np.all(first <= np.asarray(est.sample_lengths(jax.random.PRNGKey(0))))
    assert np.all(first >= 5) and np.all(first % 5 == 0)
    # Fixed horizons stay the default.
    fixed = mt.build(MetaTrainConfig(**TINY)).estimator.sample_lengths(jax.random.PRNGKey(0))
    assert set(np.asarray(fixed).tolist()) == {TINY["horizon"]}


def test_sampled_episodes_reset_with_new_lengths():
    setup = mt.build(MetaTrainConfig(**(TINY | dict(horizon=60)), min_horizon=10))
    state, seen = mt.init_state(setup), set()
    for t in range(40):
        state, _ = setup.step_fn(state, np.int32(t))
        seen |= set(jax.device_get(state.inner.length).tolist())
    assert len(seen) >= 4 and min(seen) >= 10 and max(seen) <= 60, seen


def test_objectives_score_unrolls_as_documented():
    from meta_train.estimators import OBJECTIVES

    est = mt.build(MetaTrainConfig(**TINY)).estimator
    losses = jnp.asarray([[1.0, 4.0], [0.5, 2.0]])
    finished = jnp.asarray([True, False])
    expected = {"mean": [2.5, 1.25], "mean_log": [np.log(2.0), 0.0], "final": [4.0, 0.0]}
    assert set(expected) == set(OBJECTIVES)
    for objective, want in expected.items():
        est.objective = objective
        np.testing.assert_allclose(est._fitness(losses, finished), want, rtol=1e-6, atol=1e-7)
    # The config and the CLI offer exactly these.
    MetaTrainConfig(**TINY, objective="mean_log")
    with pytest.raises(ConfigError, match=r"objective must be one of \('mean', 'mean_log'"):
        MetaTrainConfig(**TINY, objective="median")


@pytest.mark.parametrize("estimator", ["pes", "es"])
def test_centered_rank_shaping_ignores_monotone_transforms_of_the_fitness(estimator):
    # centered_rank uses only the order of the members' fitness: exp(f) moves the meta-parameters
    # exactly as f does; raw fitness (the default) does not.
    import optax

    setup = mt.build(MetaTrainConfig(**TINY))
    meta0 = setup.lopt.init(jax.random.PRNGKey(0))
    cls = type(mt.build(MetaTrainConfig(**TINY, estimator=estimator)).estimator)
    fitness = jnp.asarray([0.3, 2.0, 0.9, 1.1])
    moved = {}
    for shaping in ("raw", "centered_rank"):
        est = cls(setup.estimator.problem, meta0, population=4, truncation=5, horizon=20,
                  fitness_shaping=shaping, optimizer=optax.sgd(0.1))  # Adam's 1st step: signs
        es = est.strategy.init(jax.random.PRNGKey(1), meta0, est.es_params)
        population, es = est.strategy.ask(jax.random.PRNGKey(2), es, est.es_params)
        moved[shaping] = [
            _flat(est.strategy.get_mean(est._tell(jax.random.PRNGKey(3), population, f, es)[0]))
            for f in (fitness, jnp.exp(fitness))]
    np.testing.assert_allclose(*moved["centered_rank"], rtol=1e-6, atol=1e-9)
    assert not np.allclose(*moved["raw"], rtol=1e-3)


def test_any_optax_outer_optimizer_can_be_injected():
    # Plain optax.adam (no record_norm): the step runs, the meta-parameters move, grad_norm is NaN.
    import optax

    from meta_train.estimators import PES

    setup = mt.build(MetaTrainConfig(**TINY))
    meta0 = setup.lopt.init(jax.random.PRNGKey(0))
    est = PES(setup.estimator.problem, meta0, population=4, truncation=5, horizon=20,
              optimizer=optax.adam(1e-2))
    state = est.init(jax.random.PRNGKey(1), meta0)
    state, metrics = jax.jit(est.step)(state, jax.random.PRNGKey(2), jnp.int32(0))
    assert np.isnan(float(metrics["grad_norm"]))
    assert not np.allclose(_flat(est.mean(state)), _flat(meta0))
    # The default outer optimizer records it.
    _, history = _run(setup, mt.init_state(setup), 0, 1)
    assert np.isfinite(history[0]["grad_norm"]) and history[0]["grad_norm"] > 0


def test_inner_runs_tell_the_optimizer_their_episode_length():
    # With training progress, a member's update sees num_steps = its episode's length: the
    # unroll must equal a hand-written loop with as_optax(meta, num_steps=length).
    import optax

    import tasks
    from meta_train.inner import InnerProblem

    task = tasks.get_task("mlp_fmnist_tiny")
    lopt = learned_opt.learned_optimizer("sgdm", task.init(jax.random.PRNGKey(0)),
                                         progress_centres=(0.2, 0.6))
    meta = lopt.init(jax.random.PRNGKey(1)) | {"progress_gain": jnp.asarray([1.0, -2.0])}
    population = jax.tree.map(lambda x: jnp.stack([x] * 4), meta)
    problem = InnerProblem(task, lopt, loss_cap=10.0)
    lengths = jnp.asarray([10, 40, 10, 40])  # pair 0: 10 steps, pair 1: 40
    state = problem.reset(population, problem.init(meta, 4), jnp.ones(4, bool),
                          jax.random.PRNGKey(2), lengths)
    end, _ = problem.unroll(population, state, 6)
    for member in (0, 1):
        one = jax.tree.map(lambda x: x[member], state)
        tx = lopt.as_optax(meta, num_steps=int(lengths[member]))
        params, opt_state = one.params, tx.init(one.params)
        for s in range(6):
            batch = task.sample_batch(jax.random.fold_in(one.data_key, s), "train")
            grads = jax.grad(task.loss)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        got = jax.tree.map(lambda x: x[member], end.params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # The two lengths really lead to different runs (the schedule differs).
    assert not np.allclose(_flat(jax.tree.map(lambda x: x[0], end.params)),
                           _flat(jax.tree.map(lambda x: x[1], end.params)))


@pytest.mark.parametrize("changes", [dict(min_horizon=3), dict(min_horizon=25),
                                     dict(min_horizon=10, estimator="es")])
def test_bad_min_horizon_is_refused(changes):
    with pytest.raises(ConfigError, match="min_horizon"):
        MetaTrainConfig(**(TINY | changes))


# ---------------------------------------------------------------- experiment 1 pipeline


def test_experiment_overrides_reach_every_method_config():
    from meta_train.experiments import experiment1 as experiment

    base = experiment.PROTOCOLS["rnn_lm"]
    protocol = experiment.with_overrides(base, objective="final", min_horizon=2000,
                                         optimizer_args=[("clip_features", True),
                                                         ("init_alpha", 0.05)],
                                         horizon_factors=[1], outer_lr=3e-4,
                                         outer_schedule="cosine")
    assert (protocol.objective, protocol.min_horizon, protocol.horizon_factors) == (
        "final", 2000, (1,))
    for method in ("sgdm", "unf"):
        config = experiment.meta_config(protocol, method, 10, "/tmp/r")
        assert (config.outer_lr, config.outer_schedule) == (3e-4, "cosine")
        args = config.optimizer_args
        want = dict(base.optimizer_args) | {"clip_features": True, "init_alpha": 0.05}
        assert args == json.loads(json.dumps(want))  # the config stores tuples as lists
    assert experiment.with_overrides(base) == base


def test_experiment_summary_keeps_the_rows_not_evaluated_now(tmp_path):
    from meta_train.experiments import experiment1 as experiment

    path = tmp_path / "summary.csv"
    row = lambda task, horizon, loss: dict(task=task, method="unf", horizon=horizon,  # noqa: E731
                                           final_train_loss=loss)
    experiment.merge_summary_csv([row("rnn_lm", 2000, 1.0), row("mlp_fmnist", 2000, 2.0)], path)
    rows = experiment.merge_summary_csv([row("mlp_fmnist", 10000, 3.0),
                                         row("rnn_lm", 2000, 4.0)], path)
    assert [(r["task"], str(r["horizon"]), float(r["final_train_loss"])) for r in rows] == [
        ("mlp_fmnist", "2000", 2.0), ("mlp_fmnist", "10000", 3.0), ("rnn_lm", "2000", 4.0)]
    assert len(path.read_text().splitlines()) == 4


def test_experiment_pipeline_writes_results_and_resumes(tmp_path):
    from meta_train.experiments import experiment1 as experiment

    protocol = experiment.PROTOCOLS["mlp_fmnist"]._replace(
        task="mlp_fmnist_tiny", horizon=20, min_horizon=10, truncation=5, population=4,
        eval_seeds=2, outer_lr=0.05)
    out, runs = tmp_path / "results", tmp_path / "runs"
    for method in ("sgdm", "unf"):
        experiment.run_method(protocol, method, 6, out, runs, log=lambda s: None)
    rows = experiment.evaluate_task(protocol, ("sgdm", "unf"), out, log=lambda s: None)
    task_dir = out / "mlp_fmnist_tiny"
    assert (task_dir / "curves.png").stat().st_size > 1000
    summary = json.loads((task_dir / "unf" / "summary.json").read_text())
    assert set(summary["eval"]) == {"T=20", "T=100"}
    assert summary["outer_steps"] == 6 and summary["member_steps"] == 6 * 4 * 5
    # The protocol's rule uses training progress: the checkpoint needs the run's length.
    with pytest.raises(ValueError, match="num_steps"):
        learned_opt.load_optax(task_dir / "unf" / "optimizer")
    assert learned_opt.load_optax(task_dir / "unf" / "optimizer", num_steps=20) is not None
    assert {(r["method"], r["horizon"]) for r in rows} >= {("unf", 20), ("unf", 100),
                                                           ("adam (tuned)", 100)}
    # A rerun reuses everything; a larger budget continues the same run.
    logs = []
    experiment.run_method(protocol, "unf", 6, out, runs, log=logs.append)
    assert "done" in logs[-1]
    # A fresh clone has the results but no run directories: they are reused too.
    experiment.run_method(protocol, "sgdm", 6, out, tmp_path / "no_runs", log=logs.append)
    assert "done (6 outer steps)" in logs[-1]
    experiment.run_method(protocol, "unf", 8, out, runs, log=logs.append)
    assert "resuming from 6" in logs[-1]
    assert len(read_metrics(runs / "mlp_fmnist_tiny" / "unf")) == 8
    # A copy interrupted before meta_train.json (written last) is redone, not trusted.
    (task_dir / "unf" / "meta_train.json").unlink()
    experiment.run_method(protocol, "unf", 8, out, runs, log=logs.append)
    assert "resuming from 8" in logs[-1]
    assert json.loads((task_dir / "unf" / "meta_train.json").read_text())["outer_steps"] == 8
    with gzip.open(task_dir / "unf" / "metrics.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 8


def test_experiment_reports_the_snapshot_best_on_the_tuning_seeds(tmp_path):
    from meta_train.experiments import experiment1 as experiment

    protocol = experiment.PROTOCOLS["mlp_fmnist"]._replace(
        task="mlp_fmnist_tiny", horizon=20, min_horizon=10, truncation=5, population=4,
        outer_lr=0.05, snapshot_every=2)
    out, runs = tmp_path / "results", tmp_path / "runs"
    logs = []
    dest = experiment.run_method(protocol, "sgdm", 6, out, runs, log=logs.append)
    run_dir = runs / "mlp_fmnist_tiny" / "sgdm"
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        "step_0000002", "step_0000004", "step_0000006"]
    selection = json.loads((dest / "meta_train.json").read_text())["selection"]
    scores = {int(k): v for k, v in selection["scores"].items()}
    assert sorted(scores) == [2, 4, 6] and selection["seeds"] == [200, 201, 202]
    assert selection["selected_step"] == min(scores, key=scores.get)
    # The reported optimizer is the selected snapshot (the last step's is run_dir/optimizer).
    chosen = (run_dir / "optimizer" if selection["selected_step"] == 6 else
              run_dir / "snapshots" / f"step_{selection['selected_step']:07d}")
    assert ((dest / "optimizer" / "meta_params.msgpack").read_bytes()
            == (chosen / "meta_params.msgpack").read_bytes())
    assert "selected step" in logs[-1]


def test_wandb_online_without_key_or_network_falls_back_to_offline_at_once(monkeypatch,
                                                                         tmp_path):
    import socket

    from meta_train import tracking

    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # no key in a netrc either
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="no wandb API key.*logging offline"):
        assert tracking.usable_wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)

    def unreachable(address, timeout=None):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.warns(UserWarning, match="api.wandb.ai:443 is unreachable.*wandb sync"):
        assert tracking.usable_wandb_mode("online") == "offline"
    assert time.perf_counter() - start < 5
    assert tracking.usable_wandb_mode("disabled") == "disabled"
    assert "wandb sync" in tracking.offline_run_hint(tmp_path)


def test_progress_bar_in_a_log_file_redraws_rarely_and_shows_the_last_loss(tmp_path, capfd):
    # stderr is not a terminal here: the bar may redraw every 30 s, not every step.
    config = MetaTrainConfig(**TINY, outer_steps=30, out=str(tmp_path / "r"))
    result = mt.meta_train(config, progress=True)
    err = capfd.readouterr().err
    assert err.count("meta-train:") <= 3, err
    assert f"meta_loss={result.history[-1]['meta_loss']:.4f}" in err.rsplit("meta-train:", 1)[1]


def test_diagnose_network_term_reports_the_weight_component(tmp_path, capsys):
    # The diagnostic's cos(net, W) is ~0 exactly when the network term is kept tangent.
    import importlib.util

    import tasks

    spec = importlib.util.spec_from_file_location(
        "diagnose", ROOT / "scripts" / "diagnose_network_term.py")
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    params = tasks.get_task("mlp_fmnist_tiny").init(jax.random.PRNGKey(0))
    cosines = {}
    for tangent in (False, True):
        lopt = learned_opt.learned_optimizer("unf", params, network_tangent=tangent,
                                             progress_centres=(0.5,))
        meta = lopt.init(jax.random.PRNGKey(1)) | {"beta": jnp.float32(1.0)}
        path = learned_opt.save(tmp_path / f"opt_{tangent}", lopt, meta)
        assert diagnose.main(["--optimizer", str(path), "--task", "mlp_fmnist_tiny",
                              "--steps", "10"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("step     10")
        cosines[tangent] = float(re.search(r"cos\(net, W\) ([-+]\d\.\d+)", line).group(1))
    assert abs(cosines[True]) < 1e-3 < abs(cosines[False])


# ---------------------------------------------------------------- run directory robustness


def test_damaged_checkpoint_falls_back_to_the_older_one(pes_setup, tmp_path):
    cfg = pes_setup.config.replace(outer_steps=6, checkpoint_every=2)
    full = meta_train(cfg.replace(out=str(tmp_path / "full")), progress=False, setup=pes_setup)
    part = cfg.replace(out=str(tmp_path / "part"), outer_steps=4)
    meta_train(part, progress=False, setup=pes_setup)  # checkpoints at steps 2 and 4
    meta = mt.checkpoint.latest(tmp_path / "part")
    assert [k["step"] for k in meta["kept"]] == [4, 2]
    newest = tmp_path / "part" / "checkpoints" / meta["file"]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "meta_lo')  # a line cut short by a kill
    with pytest.warns(UserWarning, match="SHA-256.*older checkpoint|older checkpoint.*SHA-256"):
        resumed = meta_train(part.replace(resume=True, outer_steps=6), progress=False,
                             setup=pes_setup)
    np.testing.assert_array_equal(_flat(resumed.meta_params), _flat(full.meta_params))
    assert [row["step"] for row in read_metrics(tmp_path / "part")] == list(range(6))


def test_restore_names_the_leaf_and_refuses_when_nothing_is_usable(tmp_path):
    mt.checkpoint.save(tmp_path, 1, {"a": np.zeros(3, np.float32)}, "{}", 0)
    with pytest.raises(mt.checkpoint.TrainingCheckpointError, match=r"\['a'\].*shape \(3,\)"):
        mt.checkpoint.restore(tmp_path, {"a": np.zeros(4, np.float32)})
    with pytest.raises(mt.checkpoint.TrainingCheckpointError, match="int32"):
        mt.checkpoint.restore(tmp_path, {"a": np.zeros(3, np.int32)})
    (tmp_path / "checkpoints" / "step_00000001.msgpack").write_bytes(b"\x85")  # truncated
    with pytest.raises(mt.checkpoint.TrainingCheckpointError, match="step_00000001.*SHA-256"):
        mt.checkpoint.restore(tmp_path, {"a": np.zeros(3, np.float32)})


def test_resume_refuses_a_config_json_of_another_run(pes_setup, tmp_path):
    cfg = pes_setup.config.replace(outer_steps=2, out=str(tmp_path / "r"))
    meta_train(cfg, progress=False, setup=pes_setup)
    path = tmp_path / "r" / "config.json"
    path.write_text(path.read_text().replace('"std": 0.05', '"std": 0.07'))
    with pytest.raises(ConfigError, match="std=0.07.*differs from the checkpoint's 0.05"):
        meta_train(cfg.replace(resume=True, outer_steps=3), progress=False)


def test_config_sections_old_flat_configs_and_the_cosine_length(pes_setup, tmp_path):
    cfg = pes_setup.config
    sections = json.loads(cfg.to_json())
    # Runs written before sections stored a flat config.json: it still reads.
    flat = {k: v for opts in sections.values() for k, v in opts.items()}
    assert MetaTrainConfig.from_json(json.dumps(flat)) == cfg
    sections["run"]["std"] = sections["estimator"].pop("std")
    with pytest.raises(ConfigError, match=r"x.json: option\(s\) \['run.std'\] in the wrong"):
        MetaTrainConfig.from_json(json.dumps(sections), "x.json")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['stdd'\]"):
        MetaTrainConfig.from_json(json.dumps(flat | {"stdd": 1}))
    # Only the run section may change on resume; outer_steps too, unless it sets the length of
    # a cosine outer schedule.
    assert set(cfg.trajectory_fields()) == set(MetaTrainConfig.field_names()) - set(
        json.loads(cfg.to_json())["run"])
    out = tmp_path / "cos"
    cos = cfg.replace(outer_steps=2, out=str(out), outer_schedule="cosine")
    meta_train(cos, progress=False)
    with pytest.raises(ConfigError, match="outer_steps=3 differs.*cosine outer schedule"):
        meta_train(cos.replace(resume=True, outer_steps=3), progress=False,
                   given={"outer_steps", "out", "resume"})


def test_resume_keeps_the_stored_options_the_command_line_does_not_repeat(pes_setup, tmp_path):
    from meta_train.cli import parse_args

    out = tmp_path / "r"
    cfg = pes_setup.config.replace(outer_steps=2, out=str(out), snapshot_every=1,
                                   checkpoint_every=1, wandb="disabled")
    meta_train(cfg, progress=False, setup=pes_setup)
    # Only --out, --resume and --outer-steps given: the rest comes from the run.
    resumed, given = parse_args(["--out", str(out), "--resume", "--outer-steps", "3"])
    merged = runs.resolve_resume(resumed, given)
    assert (merged.snapshot_every, merged.checkpoint_every, merged.wandb) == (1, 1, "disabled")
    assert merged.outer_steps == 3 and merged.task == cfg.task
    # A given option wins.
    resumed, given = parse_args(["--out", str(out), "--resume", "--checkpoint-every", "7"])
    assert runs.resolve_resume(resumed, given).checkpoint_every == 7
    # Resuming below the checkpoint's step is refused (it used to log meta_loss nan).
    with pytest.raises(ConfigError, match="at outer step 2, past --outer-steps 1"):
        meta_train(cfg.replace(resume=True, outer_steps=1), progress=False)


def test_a_run_directory_in_use_is_refused(pes_setup, tmp_path):
    with runs.exclusive(tmp_path):
        with pytest.raises(ConfigError, match=f"{tmp_path} is in use.*pid {os.getpid()}"):
            meta_train(pes_setup.config.replace(out=str(tmp_path)), progress=False,
                       setup=pes_setup)
    with runs.exclusive(tmp_path):  # released: usable again
        pass


def test_sigterm_checkpoints_like_ctrl_c(pes_setup, tmp_path, monkeypatch):
    import signal

    real_log = MetricsLogger.log

    def terminating_log(self, step, metrics):
        real_log(self, step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", terminating_log)
    before = signal.getsignal(signal.SIGTERM)
    cfg = pes_setup.config.replace(outer_steps=6, checkpoint_every=100, out=str(tmp_path / "r"))
    with pytest.raises(KeyboardInterrupt):
        meta_train(cfg, progress=False, setup=pes_setup)
    assert signal.getsignal(signal.SIGTERM) is before
    assert 3 <= mt.checkpoint.latest(tmp_path / "r")["step"] < 6


def test_every_checkpoint_lands_after_the_metrics_of_its_steps(pes_setup, tmp_path, monkeypatch):
    # Else a kill between the two loses a metrics row for good (the resume starts after it).
    real_save, seen = mt.checkpoint.save, []

    def save(run_dir, step, *args):
        seen.append((step, len(read_metrics(run_dir))))
        return real_save(run_dir, step, *args)

    monkeypatch.setattr(mt.checkpoint, "save", save)
    cfg = pes_setup.config.replace(outer_steps=5, checkpoint_every=2, out=str(tmp_path / "r"))
    meta_train(cfg, progress=False, setup=pes_setup)
    assert seen == [(2, 2), (4, 4), (5, 5)]

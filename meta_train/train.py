"""Meta-training loop: build task, optimizer and estimator from a config, run, checkpoint, log.

Example (a few seconds on a CPU):
  >>> from meta_train import MetaTrainConfig, meta_train
  >>> cfg = MetaTrainConfig(task="mlp_fmnist_tiny", optimizer="sgdm", population=4,
  ...                       truncation=5, horizon=20, outer_steps=3, wandb="disabled",
  ...                       out="/tmp/doc_run")                              # doctest: +SKIP
  >>> result = meta_train(cfg, progress=False)                              # doctest: +SKIP
  >>> sorted(result.lopt.nominal(result.meta_params))                       # doctest: +SKIP
  ['alpha', 'beta', 'decay']

Reproducibility: the key of outer step ``t`` is ``fold_in(fold_in(PRNGKey(seed), 2), t)``, so a
run interrupted after any step and resumed from its checkpoint ends with the same
meta-parameters as an uninterrupted one.

Scale: the population axis of the inner runs is sharded over a 1-D device mesh (axis ``pop``)
with ``jax.sharding.NamedSharding``; the estimator state is replicated. With
``jax.distributed.initialize()`` called first, ``jax.devices()`` spans every host and the same
code shards the population across hosts (``python -m meta_train --num-processes``; see
docs/meta_train.md); only process 0 writes the run directory and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import learned_opt
import tasks
from learned_opt import direction
from learned_opt.direction_optimizer import learned_direction_optimizer
from meta_train import checkpoint, runs
from meta_train.callbacks import Callback, MetricsRecorder, ProgressBar, Snapshots
from meta_train.config import ConfigError, MetaTrainConfig
from meta_train.estimators import ESTIMATORS, EstimatorState, outer_optimizer
from meta_train.inner import InnerProblem
from meta_train.multitask import MultiTaskProblem
from meta_train.tracking import MetricsLogger

PyTree = Any


class Setup(NamedTuple):
    """Everything built from a config (``build``); reusable across runs of the same config."""

    config: MetaTrainConfig  # with ``loss_cap`` resolved (one task)
    task: Any  # the (first) task
    lopt: Any  # its learned optimizer (the meta-parameters fit every task's)
    estimator: Any  # meta_train.estimators.PES or FullES
    mesh: Mesh
    init_meta_params: PyTree
    shardings: EstimatorState  # of the estimator state: replicated, inner runs sharded
    step_fn: Any  # jitted (state, t) -> (state, metrics); compiled on first call


class MetaTrainResult(NamedTuple):
    lopt: Any
    meta_params: PyTree
    history: list[dict]
    run_dir: Path
    steps_done: int


def initial_meta_params(lopt, seed: int) -> PyTree:
    """The meta-parameters a run with ``seed`` starts from (its learned optimizer's init)."""
    return lopt.init(jax.random.fold_in(jax.random.PRNGKey(seed), 0))


def step_key(seed: int, t) -> jax.Array:
    """The key of outer step ``t``: a function of (seed, t) only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 2), t)


def build_task(config: MetaTrainConfig, name: str | None = None):
    """The task ``name`` (default: the config's only task) with its overrides."""
    name = config.task_names[0] if name is None else name
    names = tasks.list_tasks()
    if name not in names:
        raise ConfigError(f"unknown task {name!r}; choose one of {names}")
    try:
        return tasks.get_task(name, **config.args_of(name))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"task {name!r} rejected task_args {config.args_of(name)}: {e}") from e


def build_optimizer(config: MetaTrainConfig, task, name: str | None = None):
    """The config's learned optimizer for ``task`` (registered as ``name``)."""
    name = config.task_names[0] if name is None else name
    names = learned_opt.list_optimizers() + sorted(direction.METHODS)
    if config.optimizer not in names:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; choose one of {names}")
    params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    try:
        if config.optimizer in direction.METHODS:  # scale-free: no per-task defaults
            return learned_direction_optimizer(config.optimizer, params,
                                               task.perm_spec, **config.optimizer_args)
        # The task's defaults (e.g. a smaller initial step where 0.1 diverges), then the user's.
        # With several tasks only the user's: one optimizer must start the same on all.
        defaults = tasks.optimizer_defaults(name) if len(config.task_names) == 1 else {}
        args = defaults | config.optimizer_args
        return learned_opt.learned_optimizer(config.optimizer, params, task.perm_spec, **args)
    except (ValueError, NotImplementedError) as e:  # PermSpecError is a ValueError
        raise ConfigError(
            f"optimizer {config.optimizer!r} cannot be used with task {name!r} "
            f"(its weight space): {e}"
        ) from e


def build_problem(config: MetaTrainConfig, mesh: Mesh | None = None):
    """(config with loss_cap resolved, tasks, optimizers, inner problem) of a config; ``mesh``:
    the devices the population is sharded over."""
    loop = dict(member_loop=config.member_loop, mesh=mesh)
    names = config.task_names
    task_list = [build_task(config, n) for n in names]
    lopts = [build_optimizer(config, t, n) for t, n in zip(task_list, names, strict=True)]
    if len(names) == 1:
        cap = config.loss_cap
        if cap == 0:
            cap = 3.0 * initial_loss(task_list[0], config.seed)
            if not math.isfinite(cap) or cap <= 0:
                raise ConfigError(
                    f"could not set loss_cap automatically (initial loss {cap / 3})")
            config = config.replace(loss_cap=float(f"{cap:.6g}"))
        return config, task_list, lopts, InnerProblem(task_list[0], lopts[0], config.loss_cap,
                                                        **loop)
    if not lopts[0].agnostic:
        raise ConfigError(
            f"optimizer {config.optimizer!r} binds its meta-parameters to one weight space, so it "
            f"cannot be meta-trained on several tasks; use one of "
            f"{learned_opt.list_agnostic_optimizers()}")
    refs = []
    for name, task in zip(names, task_list, strict=True):
        ref = initial_loss(task, config.seed)
        if not math.isfinite(ref) or ref <= 0:
            raise ConfigError(f"task {name!r}: initial loss {ref} cannot normalise its fitness")
        refs.append(float(f"{ref:.6g}"))
    problems = [InnerProblem(t, lo, 3.0 * r, **loop)
                for t, lo, r in zip(task_list, lopts, refs, strict=True)]
    return config, task_list, lopts, MultiTaskProblem(problems, refs, names)


def make_mesh(population: int, shard: bool = True, devices=None) -> Mesh:
    """A 1-D mesh (axis ``pop``) over ``devices`` (default all), or the first one if not ``shard``.
    """
    devices = list(jax.devices() if devices is None else devices)
    devices = devices if shard else devices[:1]
    if population % len(devices):
        raise ConfigError(
            f"population ({population}) must be divisible by the number of devices "
            f"({len(devices)}) to shard it; change --population or pass --no-shard"
        )
    return Mesh(np.array(devices), ("pop",))


def initial_loss(task, seed: int, num: int = 4) -> float:
    """Mean training loss of ``num`` fresh task initialisations on one batch each."""

    def one(k):
        k1, k2 = jax.random.split(k)
        return task.loss(task.init(k1), task.sample_batch(k2, "train"))

    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 3), num)
    return float(jnp.mean(jax.jit(jax.vmap(one))(keys)))


def build(config: MetaTrainConfig) -> Setup:
    """Check the config against the task, optimizer and devices, and build the estimator.

    Raises:
      ConfigError: with a message naming the bad option.
    """
    mesh = make_mesh(config.population, config.shard)  # cheap checks first
    groups = len(config.task_names)
    if groups > 1 and (config.population // groups) % mesh.size:
        raise ConfigError(
            f"each task's {config.population // groups} members must be divisible by the "
            f"{mesh.size} devices to shard them; change --population or pass --no-shard")
    config, task_list, lopts, problem = build_problem(config, mesh)
    task, lopt = task_list[0], lopts[0]
    meta0 = initial_meta_params(lopt, config.seed)
    member_sharding = NamedSharding(mesh, PartitionSpec("pop")) if mesh.size > 1 else None
    estimator = ESTIMATORS[config.estimator](
        problem,
        meta0,
        population=config.population,
        truncation=config.truncation,
        horizon=config.horizon,
        std=config.std,
        optimizer=outer_optimizer(config.outer_lr, config.clip, config.outer_weight_decay,
                                  config.outer_schedule, config.outer_steps),
        objective=config.objective,
        fitness_shaping=config.fitness_shaping,
        min_horizon=config.min_horizon,
        member_sharding=member_sharding,
    )
    template = jax.eval_shape(estimator.init, jax.random.PRNGKey(0), meta0)
    shardings = state_shardings(mesh, template)
    data = task.data if groups == 1 else tuple(t.data for t in task_list)
    step_fn = make_step_fn(estimator, lopt, mesh, shardings, config.seed, data)
    return Setup(config, task, lopt, estimator, mesh, meta0, shardings, step_fn)


def state_shardings(mesh: Mesh, state: EstimatorState) -> EstimatorState:
    """Estimator state replicated; inner runs sharded along their member axis."""
    repl = NamedSharding(mesh, PartitionSpec())
    member = NamedSharding(mesh, PartitionSpec("pop"))
    return EstimatorState(
        es=jax.tree.map(lambda _: repl, state.es),
        inner=jax.tree.map(lambda _: member, state.inner),
    )


def _strong(tree: PyTree) -> PyTree:
    # Weakly-typed scalars (e.g. evosax's std) would change the jit signature after one step.
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.asarray(x).dtype), tree)


def make_step_fn(estimator, lopt, mesh: Mesh, shardings: EstimatorState, seed: int,
                 data: PyTree = None):
    """The jitted outer step ``(state, t) -> (state, metrics)``, metrics with nominal values.

    The step's key, ``step_key(seed, t)``, is derived inside the jit (no host work per step).
    The task's arrays ``data`` are an argument of the jit, placed on every device once, so the
    dataset is not embedded in the compiled program as a constant.
    """

    traces = []  # one entry per trace = per compiled version of the step

    def train_step(state, t, data):
        traces.append(t)
        state, metrics = estimator.step(state, step_key(seed, t), t, data)
        metrics = metrics | lopt.nominal(estimator.mean(state))
        return _strong(state), metrics

    repl = NamedSharding(mesh, PartitionSpec())
    data = _put(data, jax.tree.map(lambda _: repl, data))
    jitted = jax.jit(train_step, in_shardings=(shardings, repl, repl),
                     out_shardings=(shardings, repl))

    def step_fn(state, t):
        return jitted(state, t, data)

    step_fn.compiled_versions = lambda: len(traces)  # for the test that nothing recompiles
    return step_fn


def _put(tree: PyTree, shardings: PyTree) -> PyTree:
    """``jax.device_put`` of host values that every process holds whole.

    With several processes ``device_put`` gathers each leaf to check that all processes agree
    (slow for a dataset; and NaN != NaN fails it): each process places its own copy instead.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        np.shape(x), s, lambda index: np.asarray(x)[index]), tree, shardings)


def init_state(setup: Setup, meta_params: PyTree | None = None) -> EstimatorState:
    """The estimator state before the first outer step, placed on the mesh.

    Args:
      setup: from ``build``.
      meta_params: initial meta-parameters (default: the optimizer's init for this seed).
    """
    meta = setup.init_meta_params if meta_params is None else meta_params
    key = jax.random.fold_in(jax.random.PRNGKey(setup.config.seed), 1)
    state = setup.estimator.init(key, meta)
    return _put(jax.device_get(_strong(state)), setup.shardings)


def run_steps(setup: Setup, state: EstimatorState, start: int, stop: int) -> EstimatorState:
    """Advance ``state`` from outer step ``start`` to ``stop`` (no logging)."""
    for t in range(start, stop):
        state, _ = setup.step_fn(state, np.int32(t))
    return state


def meta_train(config: MetaTrainConfig, progress: bool = True,
               given: set[str] | None = None, setup: Setup | None = None,
               callbacks: Sequence[Callback] = ()) -> MetaTrainResult:
    """Run (or resume) meta-training as ``config`` says; returns the final meta-parameters.

    Args:
      config: the run's options; ``config.out`` is the run directory.
      progress: show a tqdm bar with the meta-loss and an ETA.
      given: names of the options the user set explicitly (the CLI passes them) so that a
        resumed run can reject changes to trajectory-defining options.
      setup: a ``build`` result to reuse (its compiled step included); it must have been built
        from a config with the same trajectory-defining options.
      callbacks: more hooks of the loop (:mod:`meta_train.callbacks`), called after the
        built-in ones (metrics, progress bar, snapshots).

    Writes ``DIR/config.json``, ``DIR/metrics.jsonl``, ``DIR/checkpoints/``, ``DIR/wandb/`` and
    the final ``DIR/optimizer`` (``learned_opt.save`` format). On Ctrl-C or SIGTERM, saves a
    checkpoint of the last completed step and raises ``KeyboardInterrupt``. The run directory is
    locked while it runs: a second run on it raises ``ConfigError`` naming the holder.

    With several processes (``jax.distributed``) every one calls this with the same config; only
    process 0 writes ``DIR`` (the others read it to resume, so it must be on a shared file system).
    """
    run_dir = Path(config.out)
    lock = contextlib.nullcontext()
    if runs.writes_here():
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = runs.exclusive(run_dir)
    with lock, runs.sigterm_as_interrupt():
        return _meta_train(config, progress, given, setup, callbacks)


def _meta_train(config, progress, given, setup, callbacks) -> MetaTrainResult:
    run_dir = Path(config.out)
    resume_step = runs.resume_step(config)
    if resume_step is not None:
        config = runs.resolve_resume(config, given)
        if resume_step > config.outer_steps:
            raise ConfigError(f"--resume: the run in {run_dir} is at outer step {resume_step}, "
                              f"past --outer-steps {config.outer_steps}: nothing to do (give a "
                              "larger --outer-steps to continue it)")
    compiles_here = setup is None  # a given setup's step may have been compiled already
    if setup is None:
        setup = build(config)
    else:
        runs.check_same_run(setup.config, config)
    config = config.replace(loss_cap=setup.config.loss_cap)
    writes = runs.writes_here()
    progress = progress and writes
    if writes:
        (run_dir / "config.json").write_text(config.to_json())

    state = init_state(setup)
    start = 0
    if resume_step is not None:
        start, state = checkpoint.restore(run_dir, state)
        state = _put(state, setup.shardings)
    if jax.process_count() > 1:  # else the processes' steps (and collectives) would not match
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(start, f"processes start at different outer steps: is "
                                     f"{run_dir} on a file system they all share?")
    step_fn = setup.step_fn
    per_step = setup.estimator.inner_steps_per_outer_step()

    # ``start``, not ``resume_step``: restore may have fallen back to an older checkpoint.
    logger = MetricsLogger(run_dir, dataclasses.asdict(config), config.wandb,
                           start if resume_step is not None else None,
                           config.wandb_project) if writes else runs.NoLogger()
    bar = ProgressBar(config.outer_steps, start) if progress else None
    say = bar.say if bar is not None else print
    recorder = MetricsRecorder(logger, per_step, say, hint_offline=progress)
    hooks: list[Callback] = [recorder] + ([bar] if bar is not None else [])
    if config.snapshot_every and writes:
        hooks.append(Snapshots(run_dir, setup.lopt, setup.estimator, config.snapshot_every))
    hooks += list(callbacks)

    def save(step, st):
        checkpoint.save(run_dir, step, st, config.to_json(), config.seed)

    done = start
    pending = None  # (t, metrics): fetched one step later so that the device stays busy
    last = time.perf_counter()

    def flush(p):
        nonlocal last
        t, metrics = p
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        row["inner_steps_per_s"] = per_step / max(now - last, 1e-9)
        row["wall_s"] = now - last
        last = now
        for hook in hooks:
            hook.on_step(t, row)

    def end(interrupted):
        for hook in reversed(hooks):
            hook.on_end(done, state, interrupted)

    try:
        for t in range(start, config.outer_steps):
            t_call = time.perf_counter()
            new_state, metrics = step_fn(state, np.int32(t))
            if t == start and compiles_here:  # the first call traces and compiles (blocking);
                # execution itself is asynchronous, so this is the compile time
                say(f"outer step compiled in {time.perf_counter() - t_call:.1f} s "
                    f"(tracing + XLA, once per process; devices: {setup.mesh.size}, "
                    f"processes: {jax.process_count()})")
                if bar is not None:
                    bar.restart_clock()
            if pending is not None:
                flush(pending)
                pending = None
            state, done = new_state, t + 1
            pending = (t, metrics)
            for hook in hooks:
                hook.on_state(done, state)
            if done % config.checkpoint_every == 0 and done < config.outer_steps:
                flush(pending)  # the metrics row of every step a checkpoint holds: first
                pending = None
                save(done, state)
        if pending is not None:
            flush(pending)
            pending = None
    except KeyboardInterrupt:
        save(done, state)  # first: the state of every completed step
        if pending is not None:  # metrics of the last completed step, if not yet written
            try:
                flush(pending)
            except KeyboardInterrupt:
                pass
        end(interrupted=True)
        print(f"\ninterrupted: checkpoint at step {done} in {run_dir}; continue with --resume")
        raise
    save(done, state)
    end(interrupted=False)
    meta_params = jax.device_get(setup.estimator.mean(state))
    if writes:
        learned_opt.save(run_dir / "optimizer", setup.lopt, meta_params)
    return MetaTrainResult(setup.lopt, meta_params, recorder.history, run_dir, done)

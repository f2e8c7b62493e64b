"""Benchmark meta-training: throughput, the estimator's overhead, population scaling, compile time.

For each task and population size it times one PES outer step (ask, resets, K inner steps of
every member, tell, nominal values: exactly the trainer's jitted step) against the same K inner
steps of the same members with the same learned optimizer and nothing else (``unroll only``),
both measured in this process on the same devices. Overhead = step / unroll-only - 1.
Compile times are reported separately. Runs unchanged on CPU or GPU; on CPU, set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` to shard the population over N devices.

Example::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python scripts/bench_meta_train.py --tasks mlp_fmnist --populations 8 16 64
"""

import argparse
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["mlp_fmnist"],
                   help="task names (tasks.list_tasks())")
    p.add_argument("--optimizer", default="unf", help="learned optimizer method")
    p.add_argument("--populations", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--truncation", type=int, default=20, help="K inner steps per outer step")
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--repeats", type=int, default=10, help="timed outer steps per measurement")
    p.add_argument("--no-shard", action="store_true", help="use one device only")
    p.add_argument("--combinations", action="store_true",
                   help="instead: build every --tasks x learned optimizer pair and run 3 PES "
                        "steps (population 4, K=2, T=4); print OK/REJECTED and the time")
    return p.parse_args(argv)


def check_combinations(task_names, shard):
    """Every task x optimizer: valid pairs must meta-train, invalid ones must be rejected."""
    import jax
    import numpy as np

    import learned_opt
    from meta_train import ConfigError, MetaTrainConfig
    from meta_train import train as mt

    for task_name in task_names:
        for opt in learned_opt.list_optimizers():
            t0 = time.perf_counter()
            cfg = MetaTrainConfig(task=task_name, optimizer=opt, population=4, truncation=2,
                                  horizon=4, wandb="disabled", shard=shard)
            try:
                setup = mt.build(cfg)
            except ConfigError as e:
                print(f"{task_name:<20} {opt:<9} REJECTED: {str(e)[:120]}", flush=True)
                continue
            state = mt.run_steps(setup, mt.init_state(setup), 0, 3)
            meta = setup.estimator.mean(state)
            finite = all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(meta))
            print(f"{task_name:<20} {opt:<9} {'OK' if finite else 'NON-FINITE'} "
                  f"meta-params {setup.lopt.num_meta_params():>8} "
                  f"{time.perf_counter() - t0:6.1f} s (build + compile + 3 steps)", flush=True)


def _time(fn):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def bench_one(task_name, optimizer, population, truncation, horizon, repeats, shard):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from meta_train import MetaTrainConfig
    from meta_train import train as mt

    cfg = MetaTrainConfig(task=task_name, optimizer=optimizer, population=population,
                          truncation=truncation, horizon=horizon, wandb="disabled", shard=shard)
    setup = mt.build(cfg)
    state = mt.init_state(setup)
    t = 0

    def step():
        nonlocal state, t
        state, metrics = setup.step_fn(state, np.int32(t))
        t += 1
        return metrics

    t0 = time.perf_counter()
    jax.block_until_ready(step())
    compile_step = time.perf_counter() - t0
    step()  # one more warm-up step (first resets done)

    # The same inner steps with the same learned optimizer, without the estimator.
    problem = setup.estimator.problem
    member = NamedSharding(setup.mesh, PartitionSpec("pop"))
    meta = jax.tree.map(lambda x: jnp.broadcast_to(x, (population, *jnp.shape(x))),
                        setup.init_meta_params)
    meta = jax.device_put(meta, member)
    inner = state.inner

    data = jax.device_put(setup.task.data, NamedSharding(setup.mesh, PartitionSpec()))

    @jax.jit
    def unroll_only(meta, inner, data):
        inner, out = problem.unroll(meta, inner, truncation, data)
        return inner, out.losses.mean()

    t0 = time.perf_counter()
    jax.block_until_ready(unroll_only(meta, inner, data))
    compile_unroll = time.perf_counter() - t0

    def run_unroll():
        nonlocal inner
        inner, loss = unroll_only(meta, inner, data)
        return loss

    # Alternate the two measurements so that a change of machine load hits both alike.
    step_times, unroll_times = [], []
    for _ in range(repeats):
        step_times.append(_time(step))
        unroll_times.append(_time(run_unroll))
    step_s, unroll_s = float(np.median(step_times)), float(np.median(unroll_times))
    return {
        "task": task_name, "population": population, "devices": setup.mesh.size,
        "meta_params": setup.lopt.num_meta_params(),
        "compile_step_s": compile_step, "compile_unroll_s": compile_unroll,
        "step_ms": 1e3 * step_s, "unroll_ms": 1e3 * unroll_s,
        "inner_steps_per_s": population * truncation / step_s,
        "overhead_pct": 100 * (step_s / unroll_s - 1),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.combinations:
        check_combinations(args.tasks, not args.no_shard)
        return
    import jax

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}); optimizer {args.optimizer}, K={args.truncation}, "
          f"T={args.horizon}, median of {args.repeats}")
    header = (f"{'task':<16} {'pop':>4} {'dev':>3} {'meta-params':>11} {'compile s':>9} "
              f"{'step ms':>8} {'unroll ms':>9} {'overhead':>8} {'inner steps/s':>13}")
    print(header)
    print("-" * len(header))
    for task_name in args.tasks:
        for pop in args.populations:
            r = bench_one(task_name, args.optimizer, pop, args.truncation, args.horizon,
                          args.repeats, not args.no_shard)
            print(f"{r['task']:<16} {r['population']:>4} {r['devices']:>3} "
                  f"{r['meta_params']:>11} {r['compile_step_s']:>9.1f} {r['step_ms']:>8.1f} "
                  f"{r['unroll_ms']:>9.1f} {r['overhead_pct']:>7.1f}% "
                  f"{r['inner_steps_per_s']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()

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
    p.add_argument("--member-loop", default="auto",
                   help="how each device advances its members (meta_train.inner.MEMBER_LOOPS)")
    p.add_argument("--baseline-rev", default=None,
                   help="also run this benchmark at this git revision (a temporary worktree, "
                        "one subprocess per task, alternating with the current code) and print "
                        "both side by side with the speed-up")
    p.add_argument("--combinations", action="store_true",
                   help="instead: build every --tasks x learned optimizer pair and run 3 PES "
                        "steps (population 4, K=2, T=4); print OK/REJECTED and the time")
    p.add_argument("--profile", action="store_true",
                   help="instead: where the time of a member-step goes (PES step, inner unroll, "
                        "task only, update only, Adam) with FLOP/s against a float32 matmul "
                        "measured in the same process (first --populations only)")
    p.add_argument("--figure", default=None, help="with --profile: write the roofline PNG here")
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


def bench_one(task_name, optimizer, population, truncation, horizon, repeats, shard,
              member_loop="auto"):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from meta_train import MetaTrainConfig
    from meta_train import train as mt
    from meta_train.inner import InnerProblem

    cfg = MetaTrainConfig(task=task_name, optimizer=optimizer, population=population,
                          truncation=truncation, horizon=horizon, wandb="disabled", shard=shard,
                          member_loop=member_loop)
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

    # The throughput check's yardstick: plain optax.adam training of the same members, vmapped.
    adam = InnerProblem(setup.task, _PlainUpdate(optax.adam(1e-3)), problem.loss_cap,
                        member_loop="vmap")
    adam_inner = jax.device_put(jax.jit(adam.fresh)(
        meta, jax.random.key(3), jnp.full((population,), horizon, jnp.int32)), member)
    adam_unroll = jax.jit(lambda s, d: adam.unroll(meta, s, truncation, d))
    jax.block_until_ready(adam_unroll(adam_inner, data))

    def run_adam():
        nonlocal adam_inner
        adam_inner, out = adam_unroll(adam_inner, data)
        return out.losses

    # Alternate the measurements so that a change of machine load hits them alike.
    step_times, unroll_times, adam_times = [], [], []
    for _ in range(repeats):
        step_times.append(_time(step))
        unroll_times.append(_time(run_unroll))
        adam_times.append(_time(run_adam))
    step_s, unroll_s = float(np.median(step_times)), float(np.median(unroll_times))
    return {
        "member_loop": problem.member_loop, "pes_over_adam": step_s / float(np.median(adam_times)),
        "task": task_name, "population": population, "devices": setup.mesh.size,
        "meta_params": setup.lopt.num_meta_params(),
        "compile_step_s": compile_step, "compile_unroll_s": compile_unroll,
        "step_ms": 1e3 * step_s, "unroll_ms": 1e3 * unroll_s,
        "inner_steps_per_s": population * truncation / step_s,
        "overhead_pct": 100 * (step_s / unroll_s - 1),
    }


# --------------------------------------------------------------------------------------------
# --profile: where the time of a member inner step goes, and its FLOP/s against a matmul.


class _PlainUpdate:
    """A hand-designed rule behind the learned-optimizer interface of ``InnerProblem``
    (``meta_params`` ignored), so that the inner unroll can be timed without the update
    network: ``sgd`` (the task's own share: sampling, forward, backward, p - lr g) or an
    optax transformation."""

    def __init__(self, tx):
        self.tx = tx

    def init_state(self, meta_params, params):
        del meta_params
        return self.tx.init(params)

    def update(self, meta_params, state, grads, params, num_steps=None):
        del meta_params, num_steps
        return self.tx.update(grads, state, params)


def _matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products (dot_general, conv_general_dilated) of a closed jaxpr,
    nested jaxprs included (scan bodies times their length).

    Counted on the jaxpr rather than taken from XLA's cost analysis, which counts a fused
    elementwise op at the size of its operand even when the fusion only computes a slice of it
    (the unf update on transformer_lm: 352 MFLOP for the 197 MFLOP of its per-parameter
    layers). Elementwise work is left out: it is bound by memory, not by FLOPs.
    """
    import math

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # kernel; XLA's default layout puts O first
            dn = eqn.params["dimension_numbers"]
            spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * spatial * rhs[dn.rhs_spec[1]]
        for sub in _subjaxprs(eqn):
            reps = eqn.params.get("length", 1) if name == "scan" else 1
            total += reps * _matmul_flops(sub)
    return total


def _subjaxprs(eqn):
    from jax.extend import core

    for v in eqn.params.values():
        for x in (v if isinstance(v, list | tuple) else (v,)):
            if isinstance(x, core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, core.Jaxpr):
                yield x


def _flops_bytes(fn, *args):
    """(matmul FLOPs from the jaxpr, bytes accessed from XLA's cost analysis) of ``fn``."""
    import jax

    flops = _matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return flops, float(cost.get("bytes accessed", 0.0))


def machine_limits(repeats=5, n=1024):
    """Measured in this process: float32 matmul FLOP/s (one n x n x n product on one device,
    and one per device at once, sharded) and the memory bandwidth of a sum over 64 MiB."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    key = jax.random.key(0)
    a, b = jax.random.normal(key, (2, n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("d",))
    shard = NamedSharding(mesh, PartitionSpec("d"))
    ab = jax.device_put(jnp.broadcast_to(a, (len(devices), n, n)), shard)
    bb = jax.device_put(jnp.broadcast_to(b, (len(devices), n, n)), shard)
    mm_all = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b))
    big = jnp.ones((1 << 24,), jnp.float32)  # 64 MiB: well outside the caches
    add = jax.jit(jnp.sum)
    for f, args in ((mm, (a, b)), (mm_all, (ab, bb)), (add, (big,))):
        jax.block_until_ready(f(*args))
    best = {"one": [], "all": [], "add": []}
    for _ in range(repeats):
        for k, f, args in (("one", mm, (a, b)), ("all", mm_all, (ab, bb)), ("add", add, (big,))):
            t0 = time.perf_counter()
            for _ in range(5):
                out = f(*args)
            jax.block_until_ready(out)
            best[k].append((time.perf_counter() - t0) / 5)
    flop = 2.0 * n ** 3
    return {
        "matmul_one_flops": flop / min(best["one"]),
        "matmul_all_flops": len(devices) * flop / min(best["all"]),
        "bandwidth": big.size * 4 / min(best["add"]),
    }


def profile_task(task_name, optimizer, population, truncation, horizon, repeats, shard,
                 member_loop="auto"):
    """Time, in interleaved rounds (minimum per part), the parts of a PES outer step.

    Parts (all jitted, the population sharded as in the trainer, data passed as arguments):
    ``pes step`` (the trainer's step), ``inner unroll`` (K inner steps of every member with the
    learned optimizer), ``task only`` (the same unroll with the update replaced by p - lr g:
    sampling, forward, backward), ``adam unroll`` (the same with optax.adam), ``update only``
    (K learned-optimizer updates of every member on fixed gradients: features + f + nominal
    term) and ``adam update only``. FLOPs per member-step are the matrix products of one
    member's step, unvmapped (``_matmul_flops``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from meta_train import MetaTrainConfig
    from meta_train import train as mt
    from meta_train.inner import InnerProblem

    cfg = MetaTrainConfig(task=task_name, optimizer=optimizer, population=population,
                          truncation=truncation, horizon=horizon, wandb="disabled", shard=shard,
                          member_loop=member_loop)
    setup = mt.build(cfg)
    task, lopt, K, P = setup.task, setup.lopt, truncation, population
    state = mt.init_state(setup)
    t = 0
    t0 = time.perf_counter()
    state, _ = setup.step_fn(state, np.int32(t))
    jax.block_until_ready(state)
    compile_step = time.perf_counter() - t0
    member = NamedSharding(setup.mesh, PartitionSpec("pop"))
    repl = NamedSharding(setup.mesh, PartitionSpec())
    data = jax.device_put(task.data, repl)
    meta = jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (P, *jnp.shape(x))),
                                       setup.init_meta_params), member)
    problem = setup.estimator.problem
    lengths = jnp.full((P,), horizon, jnp.int32)

    def unroll_of(prob):
        inner = jax.device_put(jax.jit(prob.fresh)(meta, jax.random.key(3), lengths), member)
        fn = jax.jit(lambda m, s, d: prob.unroll(m, s, K, d), donate_argnums=(1,))
        box = [inner]

        def run():
            box[0], out = fn(meta, box[0], data)
            return out.losses

        return run

    sgd = _PlainUpdate(optax.sgd(1e-3))
    adam = _PlainUpdate(optax.adam(1e-3))
    loop = dict(member_loop=problem.member_loop, mesh=problem.mesh)  # every part as the trainer
    runs = {
        "pes step": None,
        "inner unroll": unroll_of(problem),
        "task only": unroll_of(InnerProblem(task, sgd, problem.loss_cap, **loop)),
        "adam unroll": unroll_of(InnerProblem(task, adam, problem.loss_cap, **loop)),
    }

    def step_run():
        nonlocal state, t
        t += 1
        state, metrics = setup.step_fn(state, np.int32(t))
        return metrics

    runs["pes step"] = step_run

    # Updates alone: K updates of every member on fixed gradients (no task at all).
    params = jax.jit(jax.vmap(task.init))(jax.random.split(jax.random.key(4), P))
    grads = jax.tree.map(lambda p: 0.01 * jnp.cos(p * 7.0 + 1.0), params)
    params, grads = jax.device_put((params, grads), member)

    def updates_of(init_state, update):
        def one_member(msgp, _):
            m, s, g, p = msgp

            def body(carry, _):
                s, p = carry
                u, s = update(m, s, g, p)
                return (s, jax.tree.map(jnp.add, p, u)), None

            return jax.lax.scan(body, (s, p), None, length=K)[0]

        fn = jax.jit(lambda m, s, g, p: problem.map_members(one_member, (m, s, g, p)))
        s0 = jax.jit(jax.vmap(init_state))(meta, params)
        return lambda: fn(meta, s0, grads, params)

    runs["update only"] = updates_of(lopt.init_state,
                                     lambda m, s, g, p: lopt.update(m, s, g, p, num_steps=horizon))
    runs["adam update only"] = updates_of(adam.init_state, adam.update)

    compile_s = {}
    for k, f in runs.items():
        if k == "pes step":
            continue
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        compile_s[k] = time.perf_counter() - t0
    jax.block_until_ready(step_run())
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    sec = {k: min(v) for k, v in times.items()}

    # FLOPs (matrix products) and bytes (XLA) of ONE member's step, unvmapped.
    one = jax.tree.map(lambda x: x[0], jax.device_get(meta))
    st1 = jax.tree.map(lambda x: x[0], jax.device_get(jax.jit(problem.fresh)(
        jax.device_get(meta), jax.random.key(3), lengths)))
    p1, g1 = jax.tree.map(lambda x: x[0], jax.device_get((params, grads)))
    o1 = lopt.init_state(one, p1)

    def task_step(p, key, d):
        return jax.value_and_grad(task.loss)(p, task.sample_batch(key, data=d))

    cost = {
        "inner unroll": _flops_bytes(problem.step_one, one, st1, task.data),
        "task only": _flops_bytes(task_step, p1, jax.random.key(0), task.data),
        "update only": _flops_bytes(
            lambda m, s, g, p: lopt.update(m, s, g, p, num_steps=horizon), one, o1, g1, p1),
        "adam update only": _flops_bytes(
            lambda s, g, p: adam.update(None, s, g, p), adam.init_state(None, p1), g1, p1),
    }
    cost["adam unroll"] = (cost["task only"][0] + cost["adam update only"][0],
                           cost["task only"][1] + cost["adam update only"][1])
    cost["pes step"] = cost["inner unroll"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p1))
    return {"task": task_name, "population": P, "truncation": K, "devices": setup.mesh.size,
            "member_loop": problem.member_loop,
            "params": n_params, "compile_step_s": compile_step, "compile_s": compile_s,
            "sec": sec, "cost": cost}


def print_profile(results, limits, figure=None):
    mm = max(limits["matmul_one_flops"], limits["matmul_all_flops"])
    print(f"\nmatmul float32 1024^3: {limits['matmul_one_flops'] / 1e9:.1f} GFLOP/s on one "
          f"device, {limits['matmul_all_flops'] / 1e9:.1f} on all devices at once (limit: "
          f"{mm / 1e9:.1f}); memory bandwidth (sum of 64 MiB) "
          f"{limits['bandwidth'] / 1e9:.1f} GB/s")
    for r in results:
        P, K = r["population"], r["truncation"]
        ms = {k: 1e3 * v / (P * K) for k, v in r["sec"].items()}  # per member-step
        print(f"\n{r['task']}: {r['params']:,} parameters, population {P}, K={K}, "
              f"{r['devices']} devices, {r['member_loop']} member loop; PES step compile "
              f"{r['compile_step_s']:.1f} s; "
              f"{P * K / r['sec']['pes step']:.0f} member-steps/s")
        header = (f"{'part':<18} {'ms/member-step':>14} {'share':>6} {'MFLOP':>8} "
                  f"{'GFLOP/s':>8} {'% matmul':>8} {'FLOP/B':>7}")
        print(header)
        print("-" * len(header))
        for k in ("pes step", "inner unroll", "task only", "update only", "adam unroll",
                  "adam update only"):
            fl, by = r["cost"][k]
            rate = fl / (ms[k] * 1e-3)
            print(f"{k:<18} {ms[k]:>14.3f} {ms[k] / ms['pes step']:>6.0%} {fl / 1e6:>8.2f} "
                  f"{rate / 1e9:>8.2f} {rate / mm:>8.1%} {fl / max(by, 1):>7.2f}")
        print(f"estimator overhead (pes step / inner unroll - 1): "
              f"{r['sec']['pes step'] / r['sec']['inner unroll'] - 1:+.1%}; "
              f"unf update / adam update: "
              f"{r['sec']['update only'] / r['sec']['adam update only']:.1f}x; "
              f"pes member-step / adam member-step: "
              f"{r['sec']['pes step'] / r['sec']['adam unroll']:.1f}x")
    if figure:
        roofline_figure(results, limits, figure)


def roofline_figure(results, limits, path):
    """Achieved FLOP/s against arithmetic intensity, under the measured matmul and bandwidth
    roofs."""
    from learned_opt.extras import pyplot

    plt = pyplot()
    import numpy as np

    mm = max(limits["matmul_one_flops"], limits["matmul_all_flops"]) / 1e9
    bw = limits["bandwidth"] / 1e9
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.logspace(-1.5, 2.5, 100)
    ax.plot(xs, np.minimum(mm, bw * xs), "k-", lw=1)
    ax.text(xs[-1], mm * 1.08, f"f32 matmul {mm:.0f} GFLOP/s", ha="right", fontsize=8)
    ax.text(0.05, bw * 0.05 * 1.3, f"{bw:.0f} GB/s", fontsize=8, rotation=30)
    markers = {"inner unroll": "o", "task only": "s", "update only": "^"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        P, K = r["population"], r["truncation"]
        for part, m in markers.items():
            fl, by = r["cost"][part]
            rate = fl * P * K / r["sec"][part] / 1e9
            ax.loglog(fl / by, rate, m, color=colors[i % len(colors)],
                      label=f"{r['task']}: {part}")
    ax.set_xlabel("arithmetic intensity (matmul FLOP / byte accessed per XLA, one member-step)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Inner step of unf meta-training, population {results[0]['population']}, "
                 f"K={results[0]['truncation']}", fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.combinations:
        check_combinations(args.tasks, not args.no_shard)
        return
    if args.profile:
        limits = machine_limits()
        results = [profile_task(t, args.optimizer, args.populations[0], args.truncation,
                                args.horizon, args.repeats, not args.no_shard, args.member_loop)
                   for t in args.tasks]
        print_profile(results, limits, args.figure)
        return
    import jax

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}); optimizer {args.optimizer}, K={args.truncation}, "
          f"T={args.horizon}, median of {args.repeats}")
    if args.baseline_rev:
        compare_with_revision(args)
        return
    header = (f"{'task':<16} {'pop':>4} {'dev':>3} {'loop':>4} {'meta-params':>11} "
              f"{'compile s':>9} {'step ms':>8} {'unroll ms':>9} {'overhead':>8} "
              f"{'inner steps/s':>13} {'pes/adam':>8}")
    print(header)
    print("-" * len(header))
    for task_name in args.tasks:
        for pop in args.populations:
            r = bench_one(task_name, args.optimizer, pop, args.truncation, args.horizon,
                          args.repeats, not args.no_shard, args.member_loop)
            print(f"{r['task']:<16} {r['population']:>4} {r['devices']:>3} "
                  f"{r['member_loop']:>4} {r['meta_params']:>11} {r['compile_step_s']:>9.1f} "
                  f"{r['step_ms']:>8.1f} {r['unroll_ms']:>9.1f} {r['overhead_pct']:>7.1f}% "
                  f"{r['inner_steps_per_s']:>13.0f} {r['pes_over_adam']:>7.1f}x", flush=True)


def _bench_in(root, args, task, pop):
    """Run this benchmark's plain mode for one (task, population) with the code in ``root``
    (a subprocess); returns (compile s, inner steps/s) parsed from its table row."""
    import os
    import subprocess

    cmd = [sys.executable, str(Path(root) / "scripts" / "bench_meta_train.py"), "--tasks", task,
           "--populations", str(pop), "--truncation", str(args.truncation), "--horizon",
           str(args.horizon), "--repeats", str(args.repeats), "--optimizer", args.optimizer]
    if args.no_shard:
        cmd.append("--no-shard")
    env = dict(os.environ, PYTHONPATH=str(root))  # that revision's packages, not this one's
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(task + " ")]
    if out.returncode or not rows:
        raise RuntimeError(f"benchmark in {root} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    row = rows[-1]
    # Columns: task pop dev [loop] meta-params compile ... steps/s [pes/adam, ending in x]
    numeric = [x for x in row[3:] if x.replace(".", "").isdigit()]
    return float(numeric[1]), float(row[-2] if row[-1].endswith("x") else row[-1])

def compare_with_revision(args):
    """Each (task, population) at ``--baseline-rev`` and with the current code, one after the
    other (two packages of the same name cannot share a process), and the speed-up."""
    import subprocess
    import tempfile

    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline_rev], cwd=_ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    header = (f"{'task':<16} {'pop':>4} {'before steps/s':>14} {'after steps/s':>13} "
              f"{'speed-up':>8} {'compile before':>14} {'after':>6} {'pes/adam after':>14}")
    print(f"before: revision {rev}; after: the working tree ({args.member_loop} member loop)")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), rev], cwd=_ROOT,
                       check=True, capture_output=True)
        try:
            for task in args.tasks:
                for pop in args.populations:
                    c0, s0 = _bench_in(base, args, task, pop)
                    r = bench_one(task, args.optimizer, pop, args.truncation, args.horizon,
                                  args.repeats, not args.no_shard, args.member_loop)
                    s1 = r["inner_steps_per_s"]
                    print(f"{task:<16} {pop:>4} {s0:>14.0f} {s1:>13.0f} {s1 / s0:>7.2f}x "
                          f"{c0:>14.1f} {r['compile_step_s']:>6.1f} "
                          f"{r['pes_over_adam']:>13.1f}x", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=_ROOT,
                           capture_output=True)

if __name__ == "__main__":
    main()

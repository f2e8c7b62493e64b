"""Benchmark meta-training: throughput, the estimator's overhead, population scaling, compile time.

For each task and population size it times one PES outer step (ask, resets, K inner steps of
every member, tell, nominal values: exactly the trainer's jitted step) against the same K inner
steps of the same members with the same learned optimizer and nothing else (``unroll only``),
both measured in this process on the same devices. Overhead = step / unroll-only - 1.
Compile times are reported separately. Runs unchanged on CPU or GPU; on CPU, set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` to shard the population over N devices.
The measurements are ``meta_train.benchmarks``; this script prints them.

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
        from meta_train.benchmarks import machine_limits, profile_task

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
    bench_table(args)


def bench_table(args):
    """The plain mode: one row per task and population (``meta_train.benchmarks.bench_one``)."""
    from meta_train.benchmarks import bench_one

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

    from meta_train.benchmarks import bench_one

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

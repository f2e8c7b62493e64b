"""Benchmark one inner training step (forward, backward, SGD) of each task.

For each task: the step alone and vmapped over a population of members (every member has its
own parameters and samples its own batch), inside one ``jit`` + ``lax.scan`` over steps with the
data passed as an argument. Prints a markdown table: compile time (seconds, separate), run time
per step, per member, and the per-member cost relative to the single run measured in the same
process; then the compile cost of closing over the data. The CNN is timed with both
convolution implementations (XLA's only for ``--lax-members``).

Usage:
  LOPT_DATA_DIR=/work/shared/data nice -n 10 .venv/bin/python scripts/bench_tasks.py \
      --steps 5 --repeats 2 --lax-members 1 16
  .venv/bin/python scripts/bench_tasks.py --tasks mlp_fmnist --members 1 16 --steps 20
  .venv/bin/python scripts/bench_tasks.py --members 1 --lax-members --train-steps 2000
  .venv/bin/python scripts/bench_tasks.py --compare-matmul --members 8   # matmul_impl paths
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tasks
from meta_train.inner import train_steps

LEARNING_RATE = 0.1


def make_unroll(task, members: int, steps: int):
    """jit(params, key, data) -> (params, losses): ``steps`` SGD steps of ``members`` runs
    (``meta_train.inner.train_steps``, vmapped over the members)."""
    sgd = optax.sgd(LEARNING_RATE)

    def one_run(params, keys, data):
        params, _, losses = train_steps(task, sgd.update, params, sgd.init(params), keys, data)
        return params, losses

    def unroll(params, key, data):
        if members == 1:
            return one_run(params, jax.random.split(key, steps), data)
        keys = jax.random.split(key, (members, steps))
        return jax.vmap(one_run, in_axes=(0, 0, None))(params, keys, data)

    return jax.jit(unroll)


def bench(task, members: int, steps: int, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), members)
    params = task.init(keys[0]) if members == 1 else jax.vmap(task.init)(keys)
    unroll = make_unroll(task, members, steps)
    start = time.perf_counter()
    compiled = unroll.lower(params, jax.random.key(1), task.data).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, jax.random.key(2), task.data))  # warm-up
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(3 + r), task.data))
        times.append(time.perf_counter() - start)
    step_ms = 1e3 * min(times) / steps
    return {"compile_s": compile_s, "step_ms": step_ms, "member_ms": step_ms / members}


def bench_constants(task) -> tuple[float, float]:
    """Compile seconds of a jitted sampler that closes over the data vs takes it as argument."""
    closed = jax.jit(lambda key: task.sample_batch(key))
    passed = jax.jit(lambda key, data: task.sample_batch(key, data=data))
    start = time.perf_counter()
    closed.lower(jax.random.key(0)).compile()
    closed_s = time.perf_counter() - start
    start = time.perf_counter()
    passed.lower(jax.random.key(0), task.data).compile()
    return closed_s, time.perf_counter() - start


def train_check(task, steps: int, learning_rate: float, max_examples: int) -> dict:
    """Adam on one run for ``steps`` steps (one jitted scan); test metrics before and after."""
    opt = optax.adam(learning_rate)

    @jax.jit
    def train(params, key, data):
        params, _, losses = train_steps(task, opt.update, params, opt.init(params),
                                        jax.random.split(key, steps), data)
        return params, losses

    params = task.init(jax.random.key(0))
    before = task.evaluate(params, "test", max_examples=max_examples)
    start = time.perf_counter()
    params, losses = jax.block_until_ready(train(params, jax.random.key(1), task.data))
    seconds = time.perf_counter() - start
    after = task.evaluate(params, "test", max_examples=max_examples)
    return {"before": before, "after": after, "seconds": seconds,
            "train_last": float(losses[-max(1, steps // 10):].mean())}


def with_model(task, **changes):
    """A shallow copy of ``task`` whose model has these fields changed (same parameters)."""
    other = copy.copy(task)
    other.model = dataclasses.replace(task.model, **changes)
    return other


def compare_matmul(task, members: int, steps: int, repeats: int) -> dict:
    """The task's step with ``matmul_impl="flax"`` (JAX's transpose rules, the previous path)
    against the default ``"vjp"`` (tasks.models.matmul), in this process: the largest
    difference of the gradients of every member, and the time per step of each path (minimum
    over interleaved rounds)."""
    old, new = with_model(task, matmul_impl="flax"), with_model(task, matmul_impl="vjp")
    keys = jax.random.split(jax.random.key(0), members)
    params = jax.vmap(task.init)(keys)
    batch = jax.vmap(lambda k: task.sample_batch(k))(keys)
    grad = lambda t: jax.jit(jax.vmap(jax.value_and_grad(t.loss)))  # noqa: E731
    (l_old, g_old), (l_new, g_new) = grad(old)(params, batch), grad(new)(params, batch)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(g_old), jax.tree.leaves(g_new), strict=True))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_old))
    runs = {}
    for label, t in (("flax", old), ("vjp", new)):
        fn = make_unroll(t, members, steps).lower(params, jax.random.key(1), task.data).compile()
        jax.block_until_ready(fn(params, jax.random.key(2), task.data))
        runs[label] = fn
    times = {label: [] for label in runs}
    for r in range(repeats):
        for label, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, jax.random.key(3 + r), task.data))
            times[label].append(time.perf_counter() - start)
    ms = {label: 1e3 * min(v) / steps / members for label, v in times.items()}
    return {"loss_diff": float(np.max(np.abs(l_old - l_new))), "grad_diff": diff,
            "grad_scale": scale, "ms": ms}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+",
                        default=["mlp_fmnist", "cnn_cifar10", "rnn_lm", "transformer_lm"])
    parser.add_argument("--members", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=10, help="scanned steps per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (the best counts)")
    parser.add_argument("--lax-members", nargs="*", type=int, default=[1],
                        help="population sizes for the CNN with XLA's convolution (slow)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="also train each task with Adam for this many steps (0: skip)")
    parser.add_argument("--train-lr", type=float, default=3e-3)
    parser.add_argument("--data-dir", default=None, help="offline data (default $LOPT_DATA_DIR)")
    parser.add_argument("--compare-matmul", action="store_true",
                        help="instead: matmul_impl 'flax' (previous path) against 'vjp' "
                             "(default) at the last --members, same process")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compare_matmul:
        matmul_table(args)
        return
    variants = []
    for name in args.tasks:
        if name.startswith("cnn_cifar10"):
            variants += [(name, {"conv_impl": "im2col"}, args.members),
                         (name, {"conv_impl": "lax"}, args.lax_members)]
        else:
            variants.append((name, {}, args.members))
    step_table(args, variants)
    names = list(dict.fromkeys(name for name, _, _ in variants))
    constants_table(args, names)
    if args.train_steps:
        train_table(args, names)


def matmul_table(args):
    members = args.members[-1]
    print(f"jax {jax.__version__}, {members} members vmapped on one device, {args.steps} "
          f"steps per call, best of {args.repeats} interleaved rounds")
    print("| task | ms / member-step, flax | vjp | speed-up | max abs grad diff "
          "(max abs grad) | loss diff |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        task = tasks.get_task(name, data_dir=args.data_dir)
        r = compare_matmul(task, members, args.steps, args.repeats)
        print(f"| {name} | {r['ms']['flax']:.3f} | {r['ms']['vjp']:.3f} | "
              f"{r['ms']['flax'] / r['ms']['vjp']:.2f}x | {r['grad_diff']:.1e} "
              f"({r['grad_scale']:.1e}) | {r['loss_diff']:.1e} |", flush=True)


def step_table(args, variants):
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {args.steps} steps per call, "
          f"best of {args.repeats}")
    print("| task | members | compile (s) | ms / step | ms / step / member "
          "| per-member cost vs single |")
    print("|---|---|---|---|---|---|")
    for name, overrides, member_counts in variants:
        task = tasks.get_task(name, data_dir=args.data_dir, **overrides)
        label = name + "".join(f" ({v})" for v in overrides.values())
        single = None
        for members in member_counts:
            r = bench(task, members, args.steps, args.repeats)
            single = r["member_ms"] if members == 1 else single
            ratio = f"{r['member_ms'] / single:.2f}" if single else "-"
            print(f"| {label} | {members} | {r['compile_s']:.2f} | {r['step_ms']:.2f} | "
                  f"{r['member_ms']:.3f} | {ratio} |", flush=True)


def constants_table(args, names):
    print("\nCompile time of jit(sample_batch): data closed over (embedded as constants) vs "
          "passed as an argument")
    print("| task | data (MB) | closed over (s) | argument (s) | ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        task = tasks.get_task(name, data_dir=args.data_dir)
        mb = sum(x.nbytes for x in jax.tree.leaves(task.data)) / 1e6
        closed_s, passed_s = bench_constants(task)
        print(f"| {name} | {mb:.1f} | {closed_s:.2f} | {passed_s:.2f} | "
              f"{closed_s / passed_s:.1f} |", flush=True)


def train_table(args, names):
    print(f"\nAdam({args.train_lr}), {args.train_steps} steps, seed 0; test metrics on the "
          f"first 2,000 test examples (windows for the language models)")
    print("| task | data | test loss before | test loss after | test accuracy after "
          "| train loss (last 10%) | seconds (incl. compile) |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        task = tasks.get_task(name, data_dir=args.data_dir)
        r = train_check(task, args.train_steps, args.train_lr, 2000)
        print(f"| {name} | {task.config.data_source} | {float(r['before']['loss']):.3f} | "
              f"{float(r['after']['loss']):.3f} | {float(r['after']['accuracy']):.3f} | "
              f"{r['train_last']:.3f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

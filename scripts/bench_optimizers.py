"""Benchmark the learned optimizers against optax.adam on the paper's four tasks.

For every task and optimizer: compile time and time per inner step (task forward + backward +
optimizer update, K steps inside one jitted ``lax.scan`` with the batch sampled inside, like a
meta-training unroll), optimizer-state floats per parameter, all beside ``optax.adam`` measured
in the same process, with ratios. Also prints the meta-parameter counts next to the paper's.

Usage:
  LOPT_DATA_DIR=../shared/data python scripts/bench_optimizers.py            # everything
  python scripts/bench_optimizers.py --tasks mlp_fmnist --methods unf        # a subset
  python scripts/bench_optimizers.py --counts-only                           # counts table only
  python scripts/bench_optimizers.py --profile mlp_fmnist transformer_lm     # where time goes
  python scripts/bench_optimizers.py --tasks mlp_fmnist28_10m --methods direction_unf \
      --optimizer-arg magnitude=adam                     # a held-out architecture, options
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import learned_opt
import tasks
from learned_opt.direction import METHODS as DIRECTION_METHODS
from meta_train.cli import key_value
from meta_train.experiments.heldout import get_architecture
from meta_train.inner import train_steps

# Sizes of f reported by the paper (alpha, beta and decay included).
PAPER_COUNTS = {
    ("mlp_fmnist", "unf"): 3783, ("mlp_fmnist", "deepset"): 2788,
    ("cnn_cifar10", "unf"): 7369, ("cnn_cifar10", "deepset"): 2788,
    ("cnn_cifar10", "nfn"): 41603, ("rnn_lm", "unf"): 8043, ("transformer_lm", "unf"): 64168,
}
TASKS = ("mlp_fmnist", "cnn_cifar10", "rnn_lm", "transformer_lm")
METHODS = ("sgdm", "deepset", "unf", "nfn", "unf_deep")
NFN_TASKS = ("mlp_fmnist", "cnn_cifar10")


def count_table(task_names, methods, options=None):
    print("\n## Meta-parameter counts (alpha, beta, decay included)\n")
    print("| task | method | task spec, fixed axes relaxed (default) | fixed axes as channels "
          "| paper's spec | paper |")
    print("|---|---|---|---|---|---|")
    for name in task_names:
        task = get_architecture(name)
        params = jax.eval_shape(task.init, jax.random.key(0))
        for method in methods:
            if method == "nfn" and name not in NFN_TASKS:
                continue
            cells = []
            for spec, mode in ((task.perm_spec, "relax"), (task.perm_spec, "channels"),
                               (getattr(task, "paper_perm_spec", None), "relax")):
                if spec is None or (method == "nfn" and mode == "channels"):
                    cells.append("-")  # nfn uses the spec as given in both modes
                    continue
                if method in DIRECTION_METHODS and mode == "channels":
                    cells.append("-")  # always relaxed: one meta-parameter set for any space
                    continue
                kwargs = ((options or {}) if method in DIRECTION_METHODS
                          else {"fixed_axes": mode})
                try:
                    lopt = learned_opt.learned_optimizer(method, params, spec, **kwargs)
                    cells.append(f"{lopt.num_meta_params():,}")
                except Exception as e:  # report, do not hide, what cannot be built
                    cells.append(f"error: {type(e).__name__}")
            paper = PAPER_COUNTS.get((name, method))
            print(f"| {name} | {method} | " + " | ".join(cells) +
                  f" | {'' if paper is None else f'{paper:,}'} |")


def make_unroll(task, update_fn, steps):
    """K inner steps in one jitted scan (``meta_train.inner.train_steps``); returns the final
    params and the mean loss."""

    def unroll(params, opt_state, key):
        params, opt_state, losses = train_steps(task, update_fn, params, opt_state,
                                                jax.random.split(key, steps))
        return params, opt_state, losses.mean()

    return jax.jit(unroll)


def compile_optimizer(task, params, tx, steps):
    """Compile K steps of ``tx`` on ``task``; also count its state floats per parameter."""
    opt_state = tx.init(params)
    unroll = make_unroll(task, tx.update, steps)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = unroll.lower(params, opt_state, key).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, opt_state, key))  # warm-up
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    state_floats = sum(x.size for x in jax.tree.leaves(opt_state)
                       if jnp.issubdtype(x.dtype, jnp.floating))
    return dict(fn=compiled, args=(params, opt_state), compile_s=compile_s,
                floats_per_param=state_floats / n_params)


def time_round_robin(runs, steps, repeats):
    """Per-step ms of every run: the minimum over ``repeats`` rounds that time each run once.

    Interleaving the runs and taking the minimum keeps the ratios meaningful on a machine that
    other jobs share (a slow round hits every optimizer alike; the minimum drops the noise).
    """
    times = {label: [] for label in runs}
    for i in range(repeats):
        for label, r in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(r["fn"](*r["args"], jax.random.key(i + 1)))
            times[label].append((time.perf_counter() - t0) / steps)
    for label, r in runs.items():
        r["step_ms"] = 1e3 * min(times[label])


def speed_table(task_names, methods, steps, repeats, options=None):
    print(f"\n## Step time ({steps} steps per jitted scan, minimum over {repeats} interleaved "
          "rounds; ratio to optax.adam measured in the same process)\n")
    print("| task | optimizer | step ms | / adam | compile s | / adam | state floats/param |")
    print("|---|---|---|---|---|---|---|")
    for name in task_names:
        task = get_architecture(name)
        params = task.init(jax.random.key(0))
        # Forward + backward + plain SGD: the task's own share of a step.
        runs = {"task fwd+bwd+sgd": compile_optimizer(task, params, optax.sgd(1e-3), steps),
                "optax.adam": compile_optimizer(task, params, optax.adam(1e-3), steps)}
        for method in methods:
            if method == "nfn" and name not in NFN_TASKS:
                continue
            kwargs = (options or {}) if method in DIRECTION_METHODS else {}
            lopt = learned_opt.learned_optimizer(method, params, task.perm_spec, **kwargs)
            tx = lopt.as_optax(lopt.init(jax.random.key(1)), perm_spec=task.perm_spec)
            runs[method] = compile_optimizer(task, params, tx, steps)
        time_round_robin(runs, steps, repeats)
        base = runs["optax.adam"]
        for label, r in runs.items():
            print(f"| {name} | {label} | {r['step_ms']:.3f} | {r['step_ms'] / base['step_ms']:.2f}"
                  f" | {r['compile_s']:.2f} | {r['compile_s'] / base['compile_s']:.1f} | "
                  f"{r['floats_per_param']:.2f} |", flush=True)


def profile_table(name, repeats, members=1):
    """Where the time of one ``unf`` update goes (each part jitted alone, beside Adam);
    ``members > 1``: every part vmapped over that many members (one device), as in
    meta-training, times per member."""
    task = tasks.get_task(name)
    params = task.init(jax.random.key(0))
    lopt = learned_opt.learned_optimizer("unf", params, task.perm_spec)
    parts = unf_update_parts(task, params, lopt)
    if members > 1:  # every member with its own copy of every argument, as in meta-training
        stack = lambda t: jax.tree.map(  # noqa: E731
            lambda x: jnp.array(jnp.broadcast_to(x, (members, *jnp.shape(x)))), t)
        parts = {k: (jax.vmap(f), stack(a)) for k, (f, a) in parts.items()}
    jitted = {k: (jax.jit(f), a) for k, (f, a) in parts.items()}
    mflop = {}
    for k, (f, a) in jitted.items():  # XLA's cost analysis, per member
        cost = f.lower(*a).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        mflop[k] = float(cost.get("flops", 0.0)) / 1e6 / members
    times = time_parts(jitted, repeats, members)
    print_profile(name, lopt.config, params, members, times, mflop)


def unf_update_parts(task, params, lopt) -> dict:
    """{part: (function, arguments)}: the pieces of one ``unf`` update, the task's forward and
    backward and Adam's update."""
    import flax.linen as nn

    from learned_opt import features as feats
    from learned_opt.network import UpdateNetwork
    from learned_opt.unf import UNFLinear

    c = lopt.config
    meta = lopt.init(jax.random.key(1))
    state = lopt.init_state(meta, params)
    grads = jax.tree.map(jnp.ones_like, params)
    fm = feats.update_momenta(state.feature_momenta, grads, c.momentum_decays)
    x = feats.state_features(params, grads, fm)
    emb = feats.step_embedding(state.step, c.step_timescales)
    pointwise = UpdateNetwork(nn.Dense, c.hidden_features, c.num_layers, c.num_layers)
    v_pw = pointwise.init(jax.random.key(0), x, emb, lopt.net_spec)
    hidden = jax.tree.map(lambda a: jnp.ones(a.shape[:-1] + (c.hidden_features,)), x)
    last = UNFLinear(1)
    v_last = last.init(jax.random.key(0), hidden, lopt.net_spec)
    adam = optax.adam(1e-3)
    batch = task.sample_batch(jax.random.key(0))
    return {
        "task forward+backward": (lambda p, b: jax.grad(task.loss)(p, b), (params, batch)),
        "optax.adam update": (adam.update, (grads, adam.init(params), params)),
        "features (momenta, clip, RMS)": (
            lambda s, g, p: feats.state_features(
                p, g, feats.update_momenta(s.feature_momenta, g, c.momentum_decays)),
            (state, grads, params)),
        f"{c.num_layers} per-parameter layers": (
            lambda v, x, e: pointwise.apply(v, x, e, lopt.net_spec), (v_pw, x, emb)),
        "UNFLinear(32 -> 1) alone": (lambda v, h: last.apply(v, h, lopt.net_spec),
                                     (v_last, hidden)),
        "whole unf update": (lopt.update, (meta, state, grads, params)),
    }


def time_parts(jitted, repeats, members):
    """Seconds per call and member of every jitted part: 10 calls a round, interleaved."""
    for f, a in jitted.values():
        jax.block_until_ready(f(*a))
    times = {k: [] for k in jitted}
    for _ in range(repeats):
        for k, (f, a) in jitted.items():
            t0 = time.perf_counter()
            for _ in range(10):
                out = f(*a)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / 10 / members)
    return times


def print_profile(name, c, params, members, times, mflop):
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    per_param = 2 * ((2 + len(c.momentum_decays)) * c.hidden_features
                     + (c.num_layers - 2) * c.hidden_features ** 2 + c.hidden_features)
    print(f"\n## Profile of one unf update on {name} ({n:,} parameters; per-parameter layers: "
          f"{per_param:,} FLOP per parameter = {per_param * n / 1e6:.1f} MFLOP per step"
          f"{f'; vmapped over {members} members, ms per member' if members > 1 else ''})\n")
    print("| part | ms (minimum over rounds) | / adam | MFLOP (XLA) | GFLOP/s |")
    print("|---|---|---|---|---|")
    adam_ms = min(times["optax.adam update"])
    for k, v in times.items():
        print(f"| {k} | {1e3 * min(v):.3f} | {min(v) / adam_ms:.1f} | {mflop[k]:.2f} | "
              f"{mflop[k] / 1e3 / min(v):.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS),
                    help="task names or held-out architectures")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="learned optimizers")
    ap.add_argument("--steps", type=int, default=20, help="inner steps per timed scan")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (minimum reported)")
    ap.add_argument("--optimizer-arg", type=key_value, action="append", default=[],
                    metavar="KEY=VALUE", help="DirectionConfig option of the direction_* methods")
    ap.add_argument("--counts-only", action="store_true", help="only the count table")
    ap.add_argument("--profile", nargs="*", default=[], metavar="TASK",
                    help="only profile the parts of a unf update on these tasks")
    ap.add_argument("--members", type=int, default=1,
                    help="with --profile: vmap every part over this many members")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"devices {jax.devices()}, numpy {np.__version__}")
    if args.profile:
        for name in args.profile:
            profile_table(name, args.repeats, args.members)
        return
    count_table(args.tasks, args.methods, dict(args.optimizer_arg))
    if not args.counts_only:
        speed_table(args.tasks, args.methods, args.steps, args.repeats,
                    dict(args.optimizer_arg))


if __name__ == "__main__":
    main()

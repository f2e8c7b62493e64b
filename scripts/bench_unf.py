"""Benchmark: the fast UNFLinear against the plain reference (one basis map at a time).

For the weight spaces of the paper's four tasks and two networks,

* ``unf4x32``: a 4-layer UNF with 32 hidden channels (19 input channels, 1 output channel),
* ``f``: the paper's optimizer network: three per-parameter Dense layers 19->32->32->32 (ReLU)
  applied to every parameter, then one UNFLinear to 1 channel,
* ``layer`` (only with ``--models layer``): one UNFLinear 19 -> 1 channel, the layer alone,

it prints the number of parameters, compile time of forward+backward (jit of value_and_grad of
the sum of squared outputs), forward+backward time (minimum over repetitions: the machine is
shared and contention only adds time) and peak memory (XLA's memory
analysis of the compiled step: arguments + outputs + temporaries), for the fast layer and for
the reference, measured in the same child process, with the ratios. The reference runs with a
time limit (its compile time grows with the number of basis maps); past the limit the table
says so.

Two specs per task: ``exact`` (the network's true symmetry: input pixels, classes,
vocabulary, image channels and conv kernel offsets fixed, i.e. ``None``) and ``paper`` (the
paper's approximation: those axes get labels of their own). The paper's counts of f are
printed beside ours.

Usage:
  python scripts/bench_unf.py --quick          # MLP and CNN only, short limits
  python scripts/bench_unf.py                  # everything (about 20-40 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import learned_opt as lo
from learned_opt.testing import unf_reference as ref
from learned_opt.unf import basis_coefficients

PAPER_F = {"mlp": 3783, "cnn": 7369, "rnn": 8043, "transformer": 64168}
IN_CHANNELS = 19


# --------------------------------------------------------------------------------------------
# The paper's weight spaces (plain shapes, Flax parameter names).


def weight_space(task: str, paper: bool):
    """(shapes, spec) of a task's parameters."""
    fix = lambda label: label if paper else None  # noqa: E731
    spaces = {"mlp": _mlp_space, "cnn": _cnn_space, "rnn": _rnn_space,
              "transformer": _transformer_space}
    if task not in spaces:
        raise ValueError(f"unknown task {task!r}")
    return spaces[task](fix, paper)


def _mlp_space(fix, paper):  # 64 -> 32 -> 10
    shapes = {"Dense_0": {"kernel": (64, 32), "bias": (32,)},
              "Dense_1": {"kernel": (32, 10), "bias": (10,)}}
    spec = {"Dense_0": {"kernel": (fix("in"), "h"), "bias": ("h",)},
            "Dense_1": {"kernel": ("h", fix("out")), "bias": (fix("out"),)}}
    return shapes, spec


def _cnn_space(fix, paper):  # 3x3 convs 3 -> 16 -> 32, global average pool, linear 32 -> 10
    sp = (fix("kh"), fix("kw"))
    shapes = {"Conv_0": {"kernel": (3, 3, 3, 16), "bias": (16,)},
              "Conv_1": {"kernel": (3, 3, 16, 32), "bias": (32,)},
              "Dense_0": {"kernel": (32, 10), "bias": (10,)}}
    spec = {"Conv_0": {"kernel": sp + (fix("in"), "c0"), "bias": ("c0",)},
            "Conv_1": {"kernel": sp + ("c0", "c1"), "bias": ("c1",)},
            "Dense_0": {"kernel": ("c1", fix("out")), "bias": (fix("out"),)}}
    return shapes, spec


def _rnn_space(fix, paper):  # bytes: embedding 256x32, ReLU RNN 64, output 64x256
    shapes = {"Embed_0": {"embedding": (256, 32)},
              "RNN_0": {"i": {"kernel": (32, 64), "bias": (64,)}, "h": {"kernel": (64, 64)},
                        "initial_state": (64,)},
              "Dense_0": {"kernel": (64, 256), "bias": (256,)}}
    spec = {"Embed_0": {"embedding": (fix("vocab_in"), "e")},
            "RNN_0": {"i": {"kernel": ("e", "h"), "bias": ("h",)}, "h": {"kernel": ("h", "h")},
                      "initial_state": ("h",)},
            "Dense_0": {"kernel": ("h", fix("vocab_out")), "bias": (fix("vocab_out"),)}}
    return shapes, spec


def _transformer_space(fix, paper):  # 2 pre-LN blocks, width 32, 4 heads of 8, MLP 128, bytes
    d, vocab = 32, 256
    shapes = {"embed": {"embedding": (vocab, d)}}
    spec = {"embed": {"embedding": (fix("vocab_in"), "r0" if paper else "r")}}
    for b in range(2):
        # paper variant: each block reads a residual stream with its own label (public code)
        shapes[f"block_{b}"], spec[f"block_{b}"] = _transformer_block(b, f"r{b}" if paper else "r")
    r = "r2" if paper else "r"
    shapes["ln_final"] = {"scale": (d,), "bias": (d,)}
    spec["ln_final"] = {"scale": (r,), "bias": (r,)}
    shapes["unembed"] = {"kernel": (d, vocab), "bias": (vocab,)}
    spec["unembed"] = {"kernel": (r, fix("vocab_out")), "bias": (fix("vocab_out"),)}
    return shapes, spec


def _transformer_block(b, r):
    """(shapes, spec) of block ``b`` reading the residual stream labelled ``r``."""
    d, heads, hd, mlp = 32, 4, 8, 128
    H, Q, V, M = f"b{b}/heads", f"b{b}/qk", f"b{b}/v", f"b{b}/mlp"
    leaves = {  # path: (shape, labels)
        "ln_attn/scale": ((d,), (r,)), "ln_attn/bias": ((d,), (r,)),
        "attention/query/kernel": ((d, heads, hd), (r, H, Q)),
        "attention/query/bias": ((heads, hd), (H, Q)),
        "attention/key/kernel": ((d, heads, hd), (r, H, Q)),
        "attention/key/bias": ((heads, hd), (H, Q)),
        "attention/value/kernel": ((d, heads, hd), (r, H, V)),
        "attention/value/bias": ((heads, hd), (H, V)),
        "attention/out/kernel": ((heads, hd, d), (H, V, r)), "attention/out/bias": ((d,), (r,)),
        "ln_mlp/scale": ((d,), (r,)), "ln_mlp/bias": ((d,), (r,)),
        "mlp_in/kernel": ((d, mlp), (r, M)), "mlp_in/bias": ((mlp,), (M,)),
        "mlp_out/kernel": ((mlp, d), (M, r)), "mlp_out/bias": ((d,), (r,)),
    }
    shapes, spec = {}, {}
    for path, (shape, labels) in leaves.items():
        *parents, name = path.split("/")
        into_shapes, into_spec = shapes, spec
        for key in parents:
            into_shapes, into_spec = into_shapes.setdefault(key, {}), into_spec.setdefault(key, {})
        into_shapes[name], into_spec[name] = shape, labels
    return shapes, spec


# --------------------------------------------------------------------------------------------
# The two networks, fast and reference.


class OptimizerNet(nn.Module):
    """The paper's f: per-parameter Dense 19->32->32->32 with ReLU, then UNFLinear(1)."""

    @nn.compact
    def __call__(self, x, spec):
        for _ in range(3):
            dense = nn.Dense(32)
            x = jax.tree.map(lambda a, dense=dense: nn.relu(dense(a)), x)
        return lo.UNFLinear(1, name="unf")(x, spec)


def make_network(model: str):
    if model == "layer":
        return lo.UNFLinear(1)
    return OptimizerNet() if model == "f" else lo.UNF(32, 4, 1)


def reference_forward(model, dense, layers, x, spec):
    """The same network with every UNF layer computed by the reference, map by map."""
    if model == "f":
        for k in range(3):
            x = jax.tree.map(lambda a, k=k: jax.nn.relu(a @ dense[k]["kernel"] + dense[k]["bias"]),
                             x)
    for k, (coeffs, biases) in enumerate(layers):
        feats = biases[0].shape[0] // _fixed_size(x, spec, 0)
        x = ref.reference_apply(coeffs, biases, x, spec, feats)
        if k < len(layers) - 1:
            x = jax.tree.map(jax.nn.relu, x)
    return x


def _fixed_size(x, spec, leaf):
    _, arrays, labels = lo.spec.flatten_with_spec(x, spec)
    return math.prod(arrays[leaf].shape[a] for a, lab in enumerate(labels[leaf]) if lab is None)


def random_variables(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / math.sqrt(max(s.shape[0], 1)),
                              jnp.float32), shapes)


def measure(fn, args, reps):
    """Compile time, median step time and memory of jit(value_and_grad(fn))."""
    step = jax.jit(jax.value_and_grad(fn, has_aux=True))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    (_, out), _ = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    ma = compiled.memory_analysis()
    mem = None
    if ma is not None:
        mem = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes) / 2**20
    # The minimum: the machine is shared, and contention only ever adds time.
    return {"compile_s": compile_s, "step_s": float(np.min(times)), "mem_mib": mem}, out


def child(task: str, spec_kind: str, model: str, reps: int):
    """Runs in its own process: the fast network, then the reference; one JSON line each."""
    shapes, spec = weight_space(task, spec_kind == "paper")
    x = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(1).normal(size=s + (IN_CHANNELS,)),
                                           jnp.float32),
                     shapes, is_leaf=lambda s: isinstance(s, tuple))
    net = make_network(model)
    var_shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, spec), x)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(var_shapes))
    print(json.dumps({"impl": "count", "params": n_params}), flush=True)
    variables = random_variables(var_shapes)

    def loss_fast(v, x):
        y = net.apply(v, x, spec)
        return sum(jnp.sum(a**2) for a in jax.tree.leaves(y)), y

    res, y_fast = measure(loss_fast, (variables, x), reps)
    print(json.dumps({"impl": "fast", **res}), flush=True)

    def loss_ref(meta, x):  # differentiated w.r.t. the same parameters as the fast network
        y = reference_forward(model, *meta, x, spec)
        return sum(jnp.sum(a**2) for a in jax.tree.leaves(y)), y

    meta = reference_parameters(model, variables["params"], shapes, spec)
    res, y_ref = measure(loss_ref, (meta, x), reps)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(y_fast))
    res["max_rel_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(y_fast), jax.tree.leaves(y_ref), strict=True)) / scale
    print(json.dumps({"impl": "ref", **res}), flush=True)


def reference_parameters(model, p, shapes, spec):
    """(dense layers, UNF layers as basis coefficients): the fast network's parameters ``p``
    in the reference's format."""
    if model == "f":
        dense = [p[f"Dense_{k}"] for k in range(3)]
        widths = [32]
        layer_params = [p["unf"]]
    elif model == "layer":
        dense, widths, layer_params = [], [IN_CHANNELS], [p]
    else:
        dense = []
        widths = [IN_CHANNELS] + [32] * 3
        layer_params = [p[f"UNFLinear_{k}"] for k in range(4)]
    layers = []
    for w, lp in zip(widths, layer_params, strict=True):
        xs = jax.tree.map(lambda s, w=w: jax.ShapeDtypeStruct(s + (w,), jnp.float32), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
        layers.append(basis_coefficients({"params": lp}, xs, spec))
    return dense, layers


def run_child(task, spec_kind, model, reps, limit):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, spec_kind, model,
           "--reps", str(reps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit).stdout
        timed_out = False
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        timed_out = True
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            rows[d.pop("impl")] = d
    return rows, timed_out


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1e3:.1f}"
    return f"{v:.2f}" if isinstance(v, float) else f"{v:,}"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MLP and CNN only, short limits")
    ap.add_argument("--tasks", default="mlp,cnn,rnn,transformer")
    ap.add_argument("--specs", default="paper,exact")
    ap.add_argument("--models", default="f,unf4x32")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per (task, spec, model)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--max-params", type=float, default=5e7,
                    help="skip networks with more parameters (counted without building them)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return ap.parse_args()


def main():
    args = parse_args()
    if args.child:
        child(*args.child, reps=args.reps)
        return
    task_list = args.tasks.split(",")
    if args.quick:
        task_list, args.limit, args.reps = ["mlp", "cnn"], min(args.limit, 120.0), 5
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"limit {args.limit:.0f} s per row; step = forward+backward, min of {args.reps}")
    header = ("| task | spec | net | params | paper | compile s (fast / ref / ratio) "
              "| step ms (fast / ref / speed-up) | peak MiB (fast / ref) | max rel. diff |")
    print(header)
    print("|" + "---|" * 9)
    for task in task_list:
        for spec_kind in args.specs.split(","):
            for model in args.models.split(","):
                print(table_row(args, task, spec_kind, model), flush=True)


def table_row(args, task, spec_kind, model):
    """The table's row of one (task, spec, network): run in a child process if not too big."""
    n = count_params(task, spec_kind, model)
    if model == "f":
        n += 3  # the paper counts 3 nominal meta-parameters (alpha, beta, decay)
    paper = PAPER_F[task] if model == "f" else None
    cells = f"| {task} | {spec_kind} | {model} | {n:,} | {fmt(paper)} | "
    if n > args.max_params:
        return cells + f"not run: more than {args.max_params:,.0f} parameters | | | |"
    rows, timed_out = run_child(task, spec_kind, model, args.reps, args.limit)
    fast, refr = rows.get("fast"), rows.get("ref")
    if fast is None:
        return cells + f"fast did not finish in {args.limit:.0f} s | | | |"
    if refr is None:
        why = f"> {args.limit:.0f} s limit" if timed_out else "failed"
        return cells + (f"{fast['compile_s']:.2f} / ref {why} | {fmt(fast['step_s'], 'ms')} / - "
                        f"| {fmt(fast['mem_mib'])} / - | - |")
    return cells + (f"{fast['compile_s']:.2f} / {refr['compile_s']:.2f} / "
                    f"{refr['compile_s'] / fast['compile_s']:.1f}x | "
                    f"{fmt(fast['step_s'], 'ms')} / {fmt(refr['step_s'], 'ms')} / "
                    f"{refr['step_s'] / fast['step_s']:.1f}x | "
                    f"{fmt(fast['mem_mib'])} / {fmt(refr['mem_mib'])} | "
                    f"{refr['max_rel_diff']:.1e} |")


def count_params(task, spec_kind, model):
    shapes, spec = weight_space(task, spec_kind == "paper")
    x = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s + (IN_CHANNELS,), jnp.float32), shapes,
                     is_leaf=lambda s: isinstance(s, tuple))
    net = make_network(model)
    var_shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, spec), x)
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(var_shapes))


if __name__ == "__main__":
    main()

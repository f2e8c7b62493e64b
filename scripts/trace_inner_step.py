"""Per-op time of the inner step of meta-training, from a ``jax.profiler`` trace.

Times ``--steps`` inner steps of ``--members`` members (one device, the learned optimizer at its
initial meta-parameters, the trainer's ``InnerProblem`` with ``--member-loop``) and prints the
XLA ops that took longest, per member-step, each with the JAX operation it came from (the
``op_name`` of the compiled HLO). Used for the per-op figures in docs/meta_train.md.

  python scripts/trace_inner_step.py --task rnn_lm --members 8 --steps 5 --member-loop map
"""

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir


def parse_args(argv=None):
    from meta_train.inner import MEMBER_LOOPS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="rnn_lm", help="tasks.list_tasks()")
    p.add_argument("--optimizer", default="unf", help="learned_opt.list_optimizers()")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="inner steps per traced call")
    p.add_argument("--member-loop", default="map", choices=MEMBER_LOOPS)
    p.add_argument("--top", type=int, default=25, help="ops to print")
    add_data_dir_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_data_dir(args.data_dir)
    problem, unroll, call_args = inner_unroll(args)
    # Where each HLO op came from: "%name = ... metadata={op_name="..."".
    hlo = unroll.lower(*call_args).compile().as_text()
    origin = dict(re.findall(r'%([\w.\-]+) = .*?op_name="([^"]+)"', hlo))
    repeats = 3
    total, count = op_times(unroll, call_args, repeats)
    P, K = args.members, args.steps
    per = repeats * P * K
    print(f"{args.task}, {args.optimizer}, {P} members, K={K}, member loop "
          f"{problem.member_loop}: {sum(total.values()) / per:.1f} us of ops per member-step")
    print(f"{'us/member-step':>14} {'calls':>6}  op  <-  JAX operation")
    for name, us in total.most_common(args.top):
        src = origin.get(name, "").replace("jit(<lambda>)/", "").replace("while/body/", "")
        src = src.replace("closed_call/", "")
        print(f"{us / per:>14.1f} {count[name] / per:>6.1f}  {name}  <-  {src}")
    return 0


def inner_unroll(args):
    """(the trainer's InnerProblem, the jitted unroll of K steps, its arguments): the
    members at the learned optimizer's initial meta-parameters."""
    import jax
    import jax.numpy as jnp

    import learned_opt
    import tasks
    from meta_train.inner import InnerProblem
    from meta_train.train import initial_meta_params

    task = tasks.get_task(args.task)
    lopt = learned_opt.learned_optimizer(args.optimizer, task.init(jax.random.key(0)),
                                         task.perm_spec)
    P, K = args.members, args.steps
    meta = jax.tree.map(lambda x: jnp.broadcast_to(x, (P, *jnp.shape(x))),
                        initial_meta_params(lopt, 0))
    problem = InnerProblem(task, lopt, loss_cap=1e6, member_loop=args.member_loop)
    state = jax.jit(problem.fresh)(meta, jax.random.key(1), jnp.full((P,), 2000, jnp.int32))
    unroll = jax.jit(lambda m, s, d: problem.unroll(m, s, K, d))
    return problem, unroll, (meta, state, task.data)


def op_times(unroll, call_args, repeats):
    """(total microseconds, calls) of every XLA op of ``repeats`` traced calls (after one
    warm-up call), from a ``jax.profiler`` trace."""
    import jax

    jax.block_until_ready(unroll(*call_args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(unroll(*call_args))
        trace = next(Path(tmp).rglob("*.trace.json.gz"))
        events = json.loads(gzip.open(trace).read())["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:  # the ops of the compiled program (the runtime's own spans excluded)
        name = e.get("args", {}).get("hlo_op")
        if e.get("ph") == "X" and name and e.get("args", {}).get("hlo_module") == "jit__lambda":
            total[name] += e["dur"]
            count[name] += 1
    return total, count


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's learned-optimizer comparison: meta-train every method on every task, evaluate.

For each task (``--tasks``) and method (``--methods``, default the paper's methods of that task)
meta-trains with the paper's PES protocol for ``--budget`` outer steps (the same budget and seed
for every method), then evaluates on unseen seeds at the meta-training horizon T and at 5T
against Adam and SGD-momentum tuned on other seeds. Writes ``results/experiment1/`` (see
``meta_train.experiments.experiment1``). Rerunning the same command resumes: finished runs and
evaluations are reused, interrupted meta-training continues from its last checkpoint, a larger
``--budget`` continues the same runs.

Example::

    python scripts/experiment1.py --tasks mlp_fmnist --methods sgdm unf --budget 10000
"""

import argparse
import sys
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir, key_value
from meta_train.config import CHOICES
from meta_train.estimators import OBJECTIVES
from meta_train.experiments.experiment1 import PAPER_OUTER_STEPS, PROTOCOLS
from meta_train.tracking import WANDB_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to run (default: the paper's methods of each task; a method "
                   "a task does not support is an error)")
    p.add_argument("--budget", type=int, default=10_000,
                   help=f"outer steps per run (the paper: {PAPER_OUTER_STEPS:,})")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="JAX platform (default: JAX's choice). The population is sharded over all "
                   "devices; on this 2-core CPU one device measured 6.5 outer steps/s against "
                   "4.8 with XLA_FLAGS=--xla_force_host_platform_device_count=2 (mlp_fmnist)")
    p.add_argument("--seed", type=int, default=0, help="meta-training seed (all methods)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="meta-objective of every run (default: the task protocol's); use "
                   "another --out and --runs for another objective")
    p.add_argument("--min-horizon", type=int, default=None, metavar="T0",
                   help="episode lengths log-uniform in [T0, T] (default: the task protocol's; "
                   "T0 = T gives the paper's fixed horizon); use another --out and --runs")
    p.add_argument("--optimizer-arg", dest="optimizer_args", type=key_value, action="append",
                   default=[], metavar="KEY=VALUE",
                   help="override one option of the task protocol's rule for every method "
                   "(learned_opt.LearnedOptimizerConfig; VALUE parsed as JSON; repeatable); use "
                   "another --out and --runs")
    p.add_argument("--outer-lr", type=float, default=None,
                   help="outer learning rate of every run (default: the task protocol's); use "
                   "another --out and --runs")
    p.add_argument("--outer-schedule", choices=CHOICES["outer_schedule"], default=None,
                   help="outer learning-rate schedule of every run (default: the protocol's, "
                   "constant); use another --out and --runs")
    p.add_argument("--out", default="results/experiment1", help="results directory")
    p.add_argument("--runs", default="runs/experiment1",
                   help="meta-training run directories (checkpoints; not committed)")
    p.add_argument("--horizon-factors", nargs="+", type=int, default=None, metavar="F",
                   help="evaluate at these multiples of each task's T (default: the protocol's, "
                   "1 and 5). Evaluations are cached per horizon, so a later run with more "
                   "factors only adds the missing ones")
    p.add_argument("--skip-eval", action="store_true", help="meta-train only")
    p.add_argument("--eval-only", action="store_true", help="evaluate what is there")
    p.add_argument("--wandb", choices=WANDB_MODES, default="disabled")
    add_data_dir_flag(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.horizon_factors is not None and min(args.horizon_factors) < 1:
        p.error(f"--horizon-factors must be >= 1, got {args.horizon_factors}")
    if args.budget < 1:
        p.error(f"--budget must be >= 1, got {args.budget}")
    for task in args.tasks:
        bad = [m for m in (args.methods or ()) if m not in PROTOCOLS[task].methods]
        if bad:
            p.error(f"task {task} does not run method(s) {bad}; it runs "
                    f"{list(PROTOCOLS[task].methods)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_data_dir(args.data_dir)
    import jax

    if args.device:  # jax is imported already (the protocols): set the config, not the env
        jax.config.update("jax_platforms", args.device.replace("gpu", "cuda"))

    from meta_train.experiments.experiment1 import evaluate_task, run_method, with_overrides

    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind}; budget {args.budget:,} outer "
          f"steps per run ({100 * args.budget / PAPER_OUTER_STEPS:.1f}% of the paper's)")
    out = Path(args.out)
    rows = []
    for task in args.tasks:
        protocol = with_overrides(PROTOCOLS[task], args.objective, args.min_horizon,
                                  args.optimizer_args, args.horizon_factors, args.outer_lr,
                                  args.outer_schedule)
        methods = args.methods or list(protocol.methods)
        if not args.eval_only:
            for method in methods:
                run_method(protocol, method, args.budget, out, args.runs, args.seed, args.wandb)
        if not args.skip_eval:
            rows += evaluate_task(protocol, protocol.methods, out)
    if rows:
        print_summary(rows, out / "summary.csv")
    return 0


def print_summary(rows, path):
    """Merges ``rows`` into the summary CSV and prints their final training losses."""
    from meta_train.experiments.experiment1 import merge_summary_csv

    done = {(r["task"], str(r["horizon"])) for r in rows}
    rows = merge_summary_csv(rows, path)
    print(f"summary: {path}")
    for r in rows:
        if (r["task"], str(r["horizon"])) in done:
            loss, se = float(r["final_train_loss"]), float(r["final_train_loss_se"])
            print(f"{r['task']:<15} {r['method']:<14} T={r['horizon']:<6} train loss "
                  f"{loss:.4f} +- {se:.4f}")


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a meta-trained optimizer against tuned SGD-momentum and Adam on unseen seeds.

Trains fresh task networks for T steps with the checkpointed optimizer, optionally its own
initialisation, the same optimizer with beta = 0 (network term off), a meta-trained ``sgdm``
checkpoint, and the baselines of ``meta_train.evaluation.BASELINES`` tuned on separate tuning
seeds (``meta_train.evaluation.evaluate``). Writes ``summary.json``, ``summary.csv`` and
``curves.png`` (mean and standard error over seeds) to ``--out`` and logs them to wandb.

Example::

    python scripts/evaluate.py --run runs/unf_mlp --init --beta0 --seeds 5
"""

import argparse
import json
import sys
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir
from meta_train.tracking import WANDB_MODES


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_flag(p)
    p.add_argument("--run", help="meta-training run directory (reads config.json, optimizer/)")
    p.add_argument("--optimizer", help="optimizer checkpoint directory (default RUN/optimizer)")
    p.add_argument("--task", help="task name (default: the run's task)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="task config override (default: the run's task_args)")
    p.add_argument("--steps", type=int, help="inner steps T (default: the run's horizon)")
    p.add_argument("--num-steps", type=int, metavar="N",
                   help="run length told to optimizers that use training progress (default: "
                   "--steps); a smaller N holds their progress at 1 after N steps, as when a run "
                   "is continued past the length it was planned for")
    p.add_argument("--seeds", type=int, default=5, help="number of reported seeds (100, 101, ...)")
    p.add_argument("--tune-seeds", type=int, default=3,
                   help="number of seeds that tune the baselines' learning rates (200, 201, ...)")
    p.add_argument("--init", action="store_true",
                   help="also evaluate the optimizer's initial meta-parameters (needs --run)")
    p.add_argument("--beta0", action="store_true",
                   help="also evaluate the optimizer with beta = 0 (network term off)")
    p.add_argument("--sgdm", help="a meta-trained sgdm optimizer checkpoint to compare with")
    p.add_argument("--baselines", default="sgdm,adam",
                   help="comma-separated baselines of meta_train.evaluation.BASELINES (sgdm, "
                   "adam, adamw_cosine, adam_default; empty for none)")
    p.add_argument("--out", help="output directory (default RUN/eval or ./eval)")
    p.add_argument("--wandb", choices=WANDB_MODES, default="offline",
                   help="wandb mode")
    return p


def learned_candidates(args, run_config, num_steps):
    """Display name -> candidate (a factory of the task) for every learned optimizer to
    evaluate; ``num_steps``: the run length told to optimizers that use training progress
    (``None``: each horizon's own)."""
    import learned_opt
    from learned_opt.checkpoint import optax_for
    from meta_train import evaluation as ev
    from meta_train.train import initial_meta_params

    path = args.optimizer or (Path(args.run) / "optimizer" if args.run else None)
    if path is None:
        raise SystemExit("evaluate.py: error: give --run or --optimizer")
    lopt, meta = learned_opt.load(path)

    def candidate(lo, m):  # any task: the agnostic optimizers get its spec
        return ev.Candidate(lambda task, steps: optax_for(lo, m, num_steps or steps,
                                                          task.perm_spec if lo.agnostic else None))

    out = {f"{lopt.name} (meta-trained)": candidate(lopt, meta)}
    if args.beta0:
        if "beta" not in meta:
            raise SystemExit(f"evaluate.py: error: --beta0: optimizer {lopt.name!r} has no beta")
        out[f"{lopt.name} (meta-trained, beta=0)"] = candidate(
            lopt, meta | {"beta": 0.0 * meta["beta"]})
    if args.init:
        if run_config is None:
            raise SystemExit("evaluate.py: error: --init needs --run (the run's seed)")
        init = initial_meta_params(lopt, run_config.seed)  # exactly where the run started
        out[f"{lopt.name} (initialisation)"] = candidate(lopt, init)
    if args.sgdm:
        s_lopt, s_meta = learned_opt.load(args.sgdm)
        out[f"{s_lopt.name} (meta-trained, {Path(args.sgdm).parent.name})"] = candidate(
            s_lopt, s_meta)
    return out


def checked_choices(args, run_config) -> tuple[str, int, list[str]]:
    """Task name(s), horizon and baselines from the flags and the run, or a clear exit."""
    from meta_train import evaluation as ev

    task_name = args.task or (run_config.task if run_config else None)
    if task_name is None:
        raise SystemExit("evaluate.py: error: give --task (or --run)")
    steps = args.steps or (run_config.horizon if run_config else None)
    if steps is None:
        raise SystemExit("evaluate.py: error: give --steps (or --run)")
    if args.num_steps is not None and args.num_steps < 1:
        raise SystemExit(f"evaluate.py: error: --num-steps must be >= 1, got {args.num_steps}")
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = sorted(set(baselines) - set(ev.BASELINES))
    if unknown:
        raise SystemExit(f"evaluate.py: error: unknown baseline(s) {unknown}; choose from "
                         f"{list(ev.BASELINES)}")
    return task_name, steps, baselines


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    apply_data_dir(args.data_dir)
    import tasks
    from meta_train import evaluation as ev
    from meta_train.cli import key_value
    from meta_train.runs import load_run_config

    run_config = load_run_config(args.run) if args.run else None
    task_name, steps, baselines = checked_choices(args, run_config)
    learned = learned_candidates(args, run_config, args.num_steps)
    seeds = [ev.EVAL_SEEDS[0] + i for i in range(args.seeds)]
    tune = [ev.TUNE_SEEDS[0] + i for i in range(args.tune_seeds)]
    out = Path(args.out or (Path(args.run) / "eval" if args.run else "eval"))
    names = [t.strip() for t in task_name.split(",")]  # a multi-task run: each of its tasks
    for name in names:
        task_args = dict(run_config.args_of(name)) if run_config and not args.task else {}
        task_args |= dict(key_value(kv) for kv in args.task_arg)
        task = tasks.get_task(name, **task_args)
        where = out / name if len(names) > 1 else out
        report = ev.evaluate(task, learned | {f"{b} (tuned)" if ev.BASELINES[b].grid else b:
                                              ev.BASELINES[b] for b in baselines},
                             [steps], seeds, tune, out_dir=where, wandb_mode=args.wandb,
                             title=f"{name}, {len(seeds)} seeds",
                             info={"task": name, "task_args": task_args, "run": args.run})
        print(f"\n{name}\n{ev.format_table(report.rows)}")
        print(f"plot: {where / 'curves.png'}\nsummary: {where / 'summary.json'}")
        print(json.dumps({r["optimizer"]: round(r.get("final_train_loss", float("nan")), 4)
                          for r in report.rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

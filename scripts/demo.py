"""`make demo`: the shipped learned optimizer against tuned AdamW on a model it never saw, then
a short meta-training of its rule.

1. The shipped ``learned_opt.load_optax(SHIPPED)`` at its default schedule (no tuning) trains
   ``mlp_deep_wide`` (Fashion-MNIST MLP with 3 hidden layers of 128; meta-training never saw an
   architecture of that size) for T=2000 steps on 3 seeds that no meta-training or tuning used,
   beside AdamW with linear warm-up + cosine decay (learning rate and weight decay tuned on 2
   other seeds over a small grid) and Adam at its defaults. Prints the table and the paired
   verdicts.
2. Meta-trains the same rule (``direction_elementwise`` with the shipped options) from its
   initialisation (AdamW, step for step) on two tasks of the meta-training family for
   ``--outer-steps`` PES steps, and prints the meta-loss of the first and last steps.

``--outer-steps 0`` skips step 2; ``--seeds`` sets how many evaluation seeds step 1 uses.
"""

import argparse
import sys
import time
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir
from meta_train.tracking import WANDB_MODES

SHIPPED = "direction_elementwise_family"
ARCHITECTURE = "mlp_deep_wide"
GRID = {"lr": (3e-3, 1e-2, 3e-2), "wd": (0.0, 1e-2)}  # AdamW's search (a part of the full grid)
FAMILY_TASKS = ("fam_mlp_fmnist_16", "fam_mlp_cifar8_32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory")
    add_data_dir_flag(p)
    p.add_argument("--steps", type=int, default=2000, help="inner steps T of step 1")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds (100, 101, ...)")
    p.add_argument("--outer-steps", type=int, default=1000, help="PES outer steps of step 2")
    p.add_argument("--wandb", default="disabled", choices=WANDB_MODES)
    return p.parse_args(argv)


def evaluate_shipped(args, out: Path) -> None:
    """Step 1: the shipped optimizer, AdamW + cosine (tuned) and Adam (defaults)."""
    import learned_opt
    from meta_train import evaluation as ev
    from meta_train.experiments.heldout import get_heldout

    task = get_heldout(ARCHITECTURE)
    seeds = [ev.EVAL_SEEDS[0] + i for i in range(args.seeds)]
    shipped = ev.Candidate(lambda steps: learned_opt.load_optax(SHIPPED, task.perm_spec, steps))
    adamw = ev.BASELINES["adamw_cosine"]._replace(grid=GRID)
    print(f"1/2 {SHIPPED} (default schedule, untuned) on {ARCHITECTURE}, T={args.steps}, seeds "
          f"{seeds}; AdamW + cosine tuned on seeds {list(ev.TUNE_SEEDS[:2])} over {GRID}")
    report = ev.evaluate(task, {SHIPPED: shipped, "adamw_cosine (tuned)": adamw,
                                "adam_default": ev.BASELINES["adam_default"]},
                         [args.steps], seeds, ev.TUNE_SEEDS[:2], out_dir=out / "eval",
                         title=f"{ARCHITECTURE}, {len(seeds)} unseen seeds",
                         wandb_mode=args.wandb, log=lambda m: print("   " + m))
    print(f"\n{ev.format_table(report.rows)}\n")
    for other in ("adamw_cosine (tuned)", "adam_default"):
        print(ev.paired_text(report, SHIPPED, other, args.steps))


def shipped_rule() -> tuple[str, dict]:
    """The shipped optimizer's method and the options in which it differs from the defaults."""
    import dataclasses

    import learned_opt
    from learned_opt.direction import DirectionConfig

    lopt, _ = learned_opt.load(SHIPPED)
    default = DirectionConfig()
    return lopt.name, {k: v for k, v in dataclasses.asdict(lopt.config).items()
                       if k != "layer" and v != getattr(default, k)}


def meta_train_briefly(args, out: Path) -> None:
    """Step 2: a short meta-training of the rule on two family tasks."""
    import numpy as np

    from meta_train import MetaTrainConfig, meta_train

    rule, options = shipped_rule()
    config = MetaTrainConfig(
        task=",".join(FAMILY_TASKS), optimizer=rule, optimizer_args=options, population=8,
        truncation=20, horizon=400, min_horizon=40, outer_steps=args.outer_steps, outer_lr=5e-4,
        outer_schedule="cosine", outer_weight_decay=0.01, std=0.01, seed=0,
        out=str(out / "meta_train"), resume=True, checkpoint_every=100, wandb=args.wandb)
    print(f"\n2/2 meta-training {rule} {options} on {list(FAMILY_TASKS)}: PES, population "
          f"{config.population}, K={config.truncation}, episodes of 40-400 steps, "
          f"{config.outer_steps} outer steps -> {config.out}")
    result = meta_train(config, progress=True, given=MetaTrainConfig.field_names() - {"loss_cap"})
    losses = np.array([r["meta_loss"] for r in result.history])
    if len(losses) >= 40:
        print(f"meta-loss (mean training loss over the unrolls), first 20 outer steps "
              f"{losses[:20].mean():.4f}, last 20 {losses[-20:].mean():.4f} (episodes and "
              "tasks are sampled, so these are noisy)")
    print(f"optimizer: {Path(config.out) / 'optimizer'} (learned_opt.load_optax reads it); the "
          f"shipped {SHIPPED} had 7,500 outer steps on eight tasks (docs/pretrained.md)")


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_data_dir(args.data_dir)
    t0 = time.perf_counter()
    out = Path(args.out)
    evaluate_shipped(args, out)
    t1 = time.perf_counter()
    if args.outer_steps > 0:
        meta_train_briefly(args, out)
    print(f"\ntime: {time.perf_counter() - t0:.0f} s ({t1 - t0:.0f} s evaluation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

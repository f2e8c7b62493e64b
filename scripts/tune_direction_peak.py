"""Which schedule peak a learned-direction optimizer prefers on given tasks (tuning seeds only).

For each task: the optimizer's default schedule with its peak on a grid, lowest tail training
loss over seeds 200-201 at T steps (``meta_train.evaluation.tune``). Writes --out (JSON).

  python scripts/tune_direction_peak.py fam_mlp_fmnist_128 fam_cnn_cifar_8x16 \\
      --optimizer direction_unf_family --out results/direction/family_peak.json
"""

import argparse
import json
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="+", help="task names (tasks.list_tasks())")
    p.add_argument("--optimizer", default="direction_unf_family", help="shipped name or checkpoint")
    p.add_argument("--peaks", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default="results/direction/family_peak.json")
    add_data_dir_flag(p)
    args = p.parse_args(argv)
    apply_data_dir(args.data_dir)
    import tasks
    from meta_train import evaluation as ev
    from meta_train.experiments.heldout import direction_candidates

    tuned = direction_candidates({"x": args.optimizer}, ["x"], untrained=None)["x (lr tuned)"]
    out = {}
    for name in args.tasks:
        point, scores = ev.tune(tasks.get_task(name), tuned._replace(grid={"lr": args.peaks}),
                                ev.TUNE_SEEDS[:2], args.steps)
        out[name] = {"best": point, "scores": scores}
        print(name, point, [(s["lr"], round(s["score"], 4)) for s in scores], flush=True)
    Path(args.out).write_text(json.dumps(dict(optimizer=args.optimizer, steps=args.steps,
                                              seeds=list(ev.TUNE_SEEDS[:2]), tasks=out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluate learned-direction optimizers on architectures they never saw, against tuned AdamW.

Each --checkpoint LABEL=PATH at its default schedule (no tuning), those named by --lr-tuned
also with the schedule's peak tuned on AdamW's grid, the untrained rule (Adam's direction
normalised per tensor), and the baselines (``meta_train.evaluation.BASELINES``: AdamW with
warm-up + cosine, lr and weight decay tuned; constant Adam, lr tuned; Adam at 1e-3), all tuned
per (architecture, horizon) on --tune-seeds and reported on --seeds. One JSON per (architecture,
horizon, candidate) under --out (a rerun skips finished ones); --out/summary.md holds the table
with each candidate's paired difference to tuned AdamW.

  python scripts/evaluate_direction.py --checkpoint unf=results/direction/unf/optimizer \\
      --architectures mlp_deep_wide gru_lm --horizons 2000
"""

import argparse
import json
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir

REFERENCE = "adamw_cosine (tuned)"
UNTRAINED = "normalised Adam (untrained rule)"


def parse_args(argv):
    from meta_train import evaluation
    from meta_train.experiments.heldout import list_heldout

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                        help="a learned-direction checkpoint or shipped name (repeatable)")
    parser.add_argument("--lr-tuned", nargs="*", default=[], metavar="LABEL")
    parser.add_argument("--untrained-label", default=UNTRAINED,
                        help="label of the untrained rule (it takes the schedule peak of the "
                        "first --checkpoint: give another label when that peak differs)")
    parser.add_argument("--no-untrained", action="store_true",
                        help="leave out the untrained rule (Adam's direction normalised per "
                        "tensor)")
    parser.add_argument("--architectures", nargs="+", default=list_heldout(),
                        help="held-out architectures or task names")
    parser.add_argument("--horizons", nargs="+", type=int, default=[2000])
    parser.add_argument("--baselines", nargs="*", default=["adamw_cosine", "adam", "adam_default"],
                        choices=sorted(evaluation.BASELINES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(evaluation.EVAL_SEEDS[:3]))
    parser.add_argument("--tune-seeds", nargs="+", type=int,
                        default=list(evaluation.TUNE_SEEDS[:2]))
    parser.add_argument("--lr-grid", nargs="+", type=float, default=None,
                        help="learning rates every tuned candidate searches (default: "
                        "learned_opt.hand_designed.ADAM_LR_GRID)")
    parser.add_argument("--wd-grid", nargs="+", type=float, default=None,
                        help="AdamW weight decays searched (default: hand_designed.WD_GRID)")
    parser.add_argument("--scorecard", metavar="LABEL",
                        help="also print issue 20's counts for this candidate over every "
                             "finished cell under --out")
    parser.add_argument("--out", default="results/direction/heldout")
    add_data_dir_flag(parser)
    args = parser.parse_args(argv)
    bad = [c for c in args.checkpoint if "=" not in c]
    if bad:
        parser.error(f"--checkpoint takes LABEL=PATH, got {bad}")
    return args


def table(rows) -> str:
    from meta_train.evaluation import paired_difference

    ref = {(r["architecture"], r["horizon"]): r for r in rows if r["optimizer"] == REFERENCE}
    lines = ["| architecture | T | optimizer | hparams | final train loss | vs tuned AdamW |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        base = ref.get((r["architecture"], r["horizon"]))
        vs = ""
        if base and r is not base and "per_seed_final_train_loss" in r:
            d = paired_difference(r["per_seed_final_train_loss"],
                                  base["per_seed_final_train_loss"])
            vs = f"{d['mean']:+.4f} +- {d['se']:.4f} ({d['verdict']})"
        hp = ", ".join(f"{k} {v:g}" for k, v in (r["hparams"] or {}).items())
        lines.append(f"| {r['architecture']} | {r['horizon']} | {r['optimizer']} | {hp} | "
                     f"{r.get('final_train_loss', float('nan')):.4f} +- "
                     f"{r.get('final_train_loss_se', float('nan')):.4f} | {vs} |")
    return "\n".join(lines)


def wide_table(rows) -> str:
    """One row per (architecture, horizon), one column per candidate: final training loss,
    mean +- SE; learned candidates also their paired difference to tuned AdamW."""
    from meta_train.evaluation import paired_difference

    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    names = sorted(names, key=lambda n: (n.startswith("direction"), n != REFERENCE, n))
    cells: dict = {}
    for r in rows:
        cells[r["architecture"], r["horizon"], r["optimizer"]] = r
    lines = ["| architecture | T | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for arch, steps in dict.fromkeys((r["architecture"], r["horizon"]) for r in rows):
        ref = cells.get((arch, steps, REFERENCE))
        out = []
        for n in names:
            r = cells.get((arch, steps, n))
            if r is None or "final_train_loss" not in r:
                out.append("")
                continue
            text = f"{r['final_train_loss']:.4f} ± {r['final_train_loss_se']:.4f}"
            if ref is not None and r is not ref and n.startswith(("direction", "normalised")):
                d = paired_difference(r["per_seed_final_train_loss"],
                                      ref["per_seed_final_train_loss"])
                text += f" ({d['mean']:+.4f} ± {d['se']:.4f})"
            hp = ", ".join(f"{k} {v:g}" for k, v in (r["hparams"] or {}).items())
            out.append(text + (f" [{hp}]" if hp else ""))
        lines.append(f"| {arch} | {steps} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_data_dir(args.data_dir)
    from meta_train.evaluation import BASELINES
    from meta_train.experiments.heldout import (
        direction_candidates,
        evaluate_candidates,
        scorecard,
    )

    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    cands = (direction_candidates(checkpoints, args.lr_tuned,
                                  None if args.no_untrained else args.untrained_label)
             if checkpoints else {})
    cands |= {f"{b} (tuned)" if BASELINES[b].grid else b: BASELINES[b] for b in args.baselines}
    grids = {"lr": args.lr_grid, "wd": args.wd_grid}
    cands = {k: c._replace(grid={n: grids[n] or v for n, v in c.grid.items()})
             for k, c in cands.items()}
    evaluate_candidates(cands, args.architectures, args.horizons, args.out, args.seeds,
                        args.tune_seeds)
    # The table: every finished result under --out, this call's and earlier calls' (several
    # processes may share --out, each with its own candidates, architectures and horizons).
    files = sorted(Path(args.out).glob("*/T=*/*.json"),
                   key=lambda p: (p.parent.parent.name, int(p.parent.name[2:]), p.name))
    rows = [json.loads(p.read_text())["row"] for p in files]
    text = table(rows)
    wide = wide_table(rows)
    print(f"{text}\n\n{wide}")
    if args.scorecard:
        print(f"\n{scorecard(rows, args.scorecard)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.md").write_text(f"{text}\n\n{wide}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

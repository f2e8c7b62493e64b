"""Evaluate a weight-space-agnostic optimizer on architectures it was never meta-trained on.

Against Adam and SGD-momentum tuned on other seeds, at several horizons; results as JSON per
(architecture, horizon) in --out (a rerun skips finished ones) and a table of all of them in
--out/summary.md.

  python scripts/evaluate_pretrained.py --optimizer unf_universal_4tasks \
      --architectures mlp_deep_wide residual_mlp --horizons 2000 10000
"""

import argparse
import json
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir


def main(argv=None) -> int:
    from meta_train.experiments.heldout import list_heldout

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="unf_universal_4tasks",
                        help="a shipped optimizer's name or a checkpoint directory")
    parser.add_argument("--architectures", nargs="+", default=list_heldout(),
                        choices=list_heldout())
    parser.add_argument("--horizons", nargs="+", type=int, default=[2000])
    parser.add_argument("--out", default="results/pretrained/unf_universal_4tasks")
    add_data_dir_flag(parser)
    args = parser.parse_args(argv)
    apply_data_dir(args.data_dir)
    from meta_train.experiments.heldout import evaluate

    evaluate(args.optimizer, args.architectures, args.horizons, args.out)
    # The table covers every finished (architecture, horizon) in --out, earlier calls included.
    rows = [row for path in sorted(Path(args.out).glob("*/T=*.json"),
                                   key=lambda p: (p.parent.name, int(p.stem[2:])))
            for row in json.loads(path.read_text())["rows"]]
    lines = ["| architecture | T | method | lr | final train loss (mean +- SE) |",
             "|---|---|---|---|---|"]
    for r in rows:  # a candidate whose every grid point diverged has no loss
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['architecture']} | {r['horizon']} | {r['method']} | {lr} | "
                     f"{r.get('final_train_loss', float('nan')):.4f} +- "
                     f"{r.get('final_train_loss_se', float('nan')):.4f} |")
    table = "\n".join(lines)
    print(table)
    (Path(args.out) / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

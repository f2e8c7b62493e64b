"""Carry a meta-training run across machines: export its resumable state, or lay it out again.

``export RUN DEST``: the newest checkpoint, config, snapshots and gzipped metrics of RUN (which
may be running) into DEST, a folder small enough to commit (a few MB); ``--commit`` also commits
DEST alone (other staged changes stay staged). ``import DEST RUN``: the exported copy as a run
directory that ``python -m meta_train --out RUN --resume`` continues bit-exactly.

  python scripts/sync_run.py export runs/v2_unf results/direction/v2/unf/run --commit
  python scripts/sync_run.py import results/direction/v2/unf/run runs/v2_unf
"""

import argparse
import subprocess
import sys
from pathlib import Path

from meta_train.checkpoint import export_run, import_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="RUN -> DEST")
    ex.add_argument("run")
    ex.add_argument("dest")
    ex.add_argument("--commit", action="store_true", help="git-commit DEST (only DEST)")
    im = sub.add_parser("import", help="DEST -> RUN (an empty or new directory)")
    im.add_argument("dest")
    im.add_argument("run")
    args = p.parse_args(argv)
    if args.command == "import":
        step = import_run(args.dest, args.run)
        print(f"{args.run}: outer step {step}; continue with python -m meta_train "
              f"--out {args.run} --resume (the run's other options are stored)")
        return 0
    step = export_run(args.run, args.dest)
    print(f"{args.dest}: outer step {step}")
    if args.commit:
        subprocess.run(["git", "add", "--", args.dest], check=True)
        subprocess.run(["git", "commit", "-q", "-m", f"{Path(args.run).name}: resumable state "
                        f"at outer step {step}", "--only", "--", args.dest], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

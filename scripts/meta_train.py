"""Meta-train a learned optimizer: ``python scripts/meta_train.py --help``.

Example (about a minute on 2 CPU cores)::

    python scripts/meta_train.py --task mlp_fmnist --optimizer unf --population 16 \
        --truncation 20 --horizon 200 --outer-steps 300 --out runs/unf_mlp
    python scripts/meta_train.py --out runs/unf_mlp --resume --outer-steps 600   # continue

One of N processes (hosts) sharing the population: add ``--coordinator HOST:PORT
--num-processes N --process-id I`` (see docs/meta_train.md, "Scale").
"""

import sys
from pathlib import Path

# This file has the package's name: keep its folder off the import path so that
# ``import meta_train`` finds the package, and make the repository root importable.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "scripts"]
sys.path.insert(0, str(_ROOT))

from meta_train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

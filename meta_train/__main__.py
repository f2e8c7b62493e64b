"""``python -m meta_train --help``: the meta-training command line (also ``lopt-meta-train``)."""

import sys

from meta_train.cli import main

if __name__ == "__main__":
    sys.exit(main())

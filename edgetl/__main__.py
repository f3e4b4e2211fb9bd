"""``python -m edgetl``: the ``edgetl`` command line (``torchrun --nproc-per-node N -m edgetl train ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

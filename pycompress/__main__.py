"""``python -m pycompress`` (and ``torchrun --nproc_per_node N -m pycompress run RECIPE``): the CLI."""

import sys

from pycompress.cli import main

if __name__ == "__main__":
    sys.exit(main())

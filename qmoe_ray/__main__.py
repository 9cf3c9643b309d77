"""``python -m qmoe_ray ...``: the same as the ``qmoe-ray`` console script."""

import sys

from qmoe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())

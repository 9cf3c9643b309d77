"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/compress.py [options]``.

Without ``--address`` and without ``RAY_ADDRESS`` it starts an in-process single-node Ray cluster;
under ``ray job submit`` Ray sets ``RAY_ADDRESS`` and the job joins that cluster. Options: see
``python jobs/compress.py --help`` (the same as ``qmoe-ray compress``).
"""

import os
import sys

# Under `ray job submit --working-dir .` the package is the working directory, not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmoe_ray.job.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())

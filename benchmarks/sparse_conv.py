"""MinkUNet18A forward + backward, torch sparse backend vs MinkowskiEngine: `rayseg bench-model`.

    python benchmarks/sparse_conv.py [--voxels 100000] [--voxel-size 0.02] [--repeats 3] [--threads N]
"""

import sys

from rayseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-model", *sys.argv[1:]]))

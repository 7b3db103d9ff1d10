"""Throughput benchmark; the same as ``vitdistill bench throughput`` (see --help).

    python benchmarks/throughput.py --data-cifar32 ../shared/datasets/cifar10-jpg.tar.gz --json throughput.json
"""

import sys

from vitdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))

"""Sparse kernels against dense torch F.linear: the issue's table of speedups, each next to its
physical limit (the bytes ratio) and the measured memory bandwidth, plus torch's CSR matmul and
the crossover in M. The logic lives in sparseflow.bench.kernels; this script is its command line.

    python benchmarks/bench_kernels.py                     # 3 shapes, M=1, bf16 then fp32 (~3-5 min, 2 cores)
    python benchmarks/bench_kernels.py --quick             # one 2048x2048 shape, bf16 (~20 s)
    python benchmarks/bench_kernels.py --format bitmask --sparsity 0.3,0.5,0.7,0.9 --plot bitmask.png
    python benchmarks/bench_kernels.py --shape 4096x4096 --m 1,16,128 --dtype fp32 --isa avx2
    python benchmarks/bench_kernels.py --threads 1 --clock thread   # on a machine others keep busy
    python benchmarks/bench_kernels.py --flush torch       # every call after a full cache flush

Each call reads its weight cold, as a model's next layer does (--flush layers, the default: blocks
of copies of the weight, 2x the LLC in all), with the code as warm as between a model's layers.

Writes benchmarks/results/kernels.json (--json PATH to change, --json '' for none); --markdown PATH
writes the tables for RESULTS.md. Exit status 1 when a kernel computes a wrong result.
"""

import sys
from pathlib import Path

from sparseflow.bench.kernels import main

if __name__ == "__main__":
    sys.exit(
        main(
            default_json=Path(__file__).resolve().parent / "results" / "kernels.json",
            prog="python benchmarks/bench_kernels.py",
        )
    )

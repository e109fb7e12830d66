"""Benchmarks as a library: interleaved timing (timing), measured memory bandwidth (bandwidth),
the kernel benchmark against dense torch (kernels) and its tables and plot (report).

    from sparseflow.bench import kernels
    report = kernels.run(kernels.Options.quick())     # or kernels.main(["--quick"])
"""

from .bandwidth import Bandwidth, copy_bandwidth, llc_bytes, read_bandwidth
from .timing import Ratio, Stats, cache_flusher, compare, paired_ratio

__all__ = [
    "Bandwidth",
    "Ratio",
    "Stats",
    "cache_flusher",
    "compare",
    "copy_bandwidth",
    "llc_bytes",
    "paired_ratio",
    "read_bandwidth",
]

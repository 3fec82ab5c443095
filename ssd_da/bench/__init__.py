"""Benchmarks of ssd_da (``tools/benchmark.py``): one timing core (:mod:`ssd_da.bench.core`), then
the loader, memory, throughput, metric, module and GPU-suite benchmarks built on it."""

"""Benchmarks of every backend (numpy_ref, torch CPU, torch CUDA; later kernels) of each op.

Run ``python -m benchmarks --help`` from the repository root. `benchmarks.cases` is the registry
of problems and backends, `benchmarks.runner` validates and times them, `benchmarks.measure`
measures what else a run depends on (peak memory, the run's noise, the machine), and
`benchmarks.report` prints the table and writes the JSON.
"""

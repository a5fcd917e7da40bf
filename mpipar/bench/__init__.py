"""Tools for measuring mpipar, not part of it: the benchmark harness (``harness``), machine
probes and quiet rounds (``machine``), the HTTP load generator (``loadgen``) and the
server job that tests and benchmarks start (``job``).

Programs (programs/bench_*.py) and tests import this package; the library and the
server never do.
"""

"""Benchmarks that run where the suite runs (guest, SSH target, host): stdlib + bpfkit only.

They are commands, not tests: pytest never collects this package, and every number they
print has been checked for correctness first.  `python3 -m bench --help` from selftests/.
"""

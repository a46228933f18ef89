"""`run-selftests` and its subcommands, one module each.

`cli` parses the command line and dispatches; `pipeline` is the default command
(one run, top to bottom); the others (`reparse` for `parse`, `bench`,
`bench_loop`, `bisect`, `matrix`, `regressions` with `regression_verdict`,
`mutants`) are built on the pipeline.
"""

"""`run-selftests`: argument parsing, subcommand dispatch, errors mapped to exit codes.

With no subcommand it runs the pipeline (runner.commands.pipeline).  A subcommand is
a module named in SUBCOMMANDS that provides `add_arguments(parser)` and
`main(args) -> int`; later commands (bisect, bench, matrix, regressions)
compose the option groups of runner.commands.options they can use, so a
command never offers an option it would have to refuse.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from runner.cache import CACHE_DIR_ENV
from runner.commands import option_groups, pipeline
from runner.errors import (
    ExitCode,
    Interrupted,
    RunnerError,
    exit_code_table,
    machine_state_error,
)
from runner.interrupts import install_sigterm_handler

# name -> module providing add_arguments(parser) and main(args) -> int.
SUBCOMMANDS = {
    "parse": "runner.commands.reparse",
    "regressions": "runner.commands.regressions",
    "mutants": "runner.commands.mutants",
    "bisect": "runner.commands.bisect",
    "bench": "runner.commands.bench",
    "bench-loop": "runner.commands.bench_loop",
    "matrix": "runner.commands.matrix",
}

EPILOG = f"""\
defaults:
  kernel      Debian's linux-source-6.1 (fetched with apt into the cache) with
              kernel_patches/series applied and kconfig/sk-storage.config merged
  cache       ${CACHE_DIR_ENV}, else $XDG_CACHE_HOME/sk-storage-selftests,
              else ~/.cache/sk-storage-selftests
  output      ./runs/<UTC timestamp> (./runs/latest points at the newest)

subcommands:
  run-selftests parse OUTPUT_DIR   re-judge a saved run from its files
  run-selftests regressions        build each kernel_patches/regressions patch, run the
                                   suite, table which bugs the suite caught
  run-selftests mutants [--only ID,...] [--from-diff PATCH] [--list]
                                   build each kernel_patches/mutants edit of the sk-storage
                                   code, run the suite, table killed/survived and the score
  run-selftests bisect --good REV --bad REV [-k EXPR] [--series FILE] [--runs N]
                                   find the commit that broke the tests (git bisect run)
  run-selftests bench [--host] [--sweep] [--repeat N] [--burst K]
                                   sk storage vs hash map egress benchmark (the seed's)
  run-selftests bench-loop --output DIR [--runs N] [--loops warm,edit,checkout,pytest]
                                   time the edit-to-verdict loops on this machine, one table
  run-selftests matrix [--kernels distro:5.10,...,build:DIR,image:PATH]
                                   the suite on several kernels, one table

exit codes:
{exit_code_table()}
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of a plain run (no subcommand)."""
    parser = option_groups.Parser(
        prog="run-selftests",
        description="Build (or fetch) a kernel, boot it under virtme-ng/QEMU and run the "
                    "BPF sk local storage selftests in it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    option_groups.add_run_options(parser)
    return parser


def dispatch(argv: list[str]) -> int:
    """Run the subcommand named by argv[0], or the default pipeline."""
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        parser = option_groups.Parser(prog=f"run-selftests {argv[0]}",
                                         description=module.__doc__,
                                         epilog=f"exit codes:\n{exit_code_table()}",
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        return int(module.main(parser.parse_args(argv[1:])))
    args = build_parser().parse_args(argv)
    return pipeline.run(option_groups.options_from_args(args, argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: exit code per runner.errors.ExitCode, one-line errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    install_sigterm_handler()
    try:
        return dispatch(argv)
    except RunnerError as error:
        print(f"run-selftests: error: {error.message}", file=sys.stderr)
        for line in error.details:
            print(f"  {line}", file=sys.stderr)
        return int(error.exit_code)
    except (KeyboardInterrupt, Interrupted):
        print("run-selftests: interrupted; any applied patches were removed", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except OSError as error:
        known = machine_state_error(error)
        if known is None:
            return runner_bug(error)
        print(f"run-selftests: error: {known.message}", file=sys.stderr)
        return int(known.exit_code)
    except Exception as error:  # noqa: BLE001 - any other escape is a bug: exit 8
        return runner_bug(error)


def runner_bug(error: BaseException) -> int:
    """An exception escaped the runner: a bug, never a verdict on the kernel (exit 8).

    The traceback goes to stderr unless the pipeline already logged it and saved it.
    """
    saved = getattr(error, "runner_traceback", None)
    if saved is None:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    where = f"; traceback in {saved}" if saved else ""
    print(f"run-selftests: error: bug in run-selftests ({type(error).__name__}: {error})"
          f"{where}; please report it", file=sys.stderr)
    return int(ExitCode.RUNNER_BUG)


if __name__ == "__main__":
    sys.exit(main())

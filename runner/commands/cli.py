"""`run-selftests`: argument parsing, subcommand dispatch, errors mapped to exit codes.

With no subcommand it runs the pipeline (runner.commands.pipeline).  A subcommand is
a module named in SUBCOMMANDS that provides `add_arguments(parser)` and
`main(args) -> int`; later commands (bisect, bench, matrix, regressions)
register there and reuse add_run_arguments/options_from_args for the
kernel, boot and test options they share with a plain run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from runner.cache import CACHE_DIR_ENV
from runner.commands import pipeline
from runner.errors import (
    ExitCode,
    Interrupted,
    RunnerError,
    exit_code_table,
    machine_state_error,
)
from runner.interrupts import install_sigterm_handler
from runner.stages.prebuilt import DISTRO_SUITES
from runner.targets import keep, remote

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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a plain run; other subcommands add them to share the same knobs."""
    kernel = parser.add_argument_group("kernel to test (default: Debian 6.1 source + series)")
    kernel.add_argument("--kernel-src", type=Path, metavar="DIR",
                        help="your kernel tree (git or plain); built with no series unless "
                             "--series is given")
    kernel.add_argument("--base", metavar="REV",
                        help="build --kernel-src at REV in a separate worktree (git only)")
    kernel.add_argument("--series", type=Path, metavar="FILE",
                        help="quilt series of patches (or commit ids) applied for the build")
    kernel.add_argument("--force", action="store_true",
                        help="apply the series even onto files with uncommitted edits")
    kernel.add_argument("--config", type=Path, action="append", default=[], metavar="FRAG",
                        help="extra config fragment (repeatable), merged after "
                             "kconfig/sk-storage.config")
    kernel.add_argument("--debug-kernel", action="store_true",
                        help="build with kconfig/debug.config too (KASAN, lockdep, kmemleak; own "
                             "build directory); after the suite, a kmemleak leak through BPF "
                             "local storage fails the run")
    kernel.add_argument("-j", "--jobs", type=int, default=pipeline.RunOptions.jobs,
                        metavar="N", help="parallel make jobs (default: %(default)s, the core count)")
    kernel.add_argument("--kernel-image", type=Path, metavar="PATH",
                        help="boot this bzImage/vmlinuz instead of building")
    kernel.add_argument("--modules", type=Path, metavar="DIR",
                        help="lib/modules/<release> directory for --kernel-image")
    kernel.add_argument("--distro-kernel", choices=sorted(DISTRO_SUITES, key=_version_key),
                        metavar="VERSION",
                        help="boot Debian's kernel for VERSION "
                             f"({', '.join(sorted(DISTRO_SUITES, key=_version_key))})")

    guest = parser.add_argument_group("guest")
    guest.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                       help="auto uses KVM only when it really works, else TCG "
                            "(default: %(default)s)")
    guest.add_argument("--cpus", type=int, default=2, help="vCPUs (default: %(default)s)")
    guest.add_argument("--memory", default="2G", help="guest memory (default: %(default)s)")
    guest.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                       help="bound on boot + tests (default: %(default)s)")
    guest.add_argument("--stall-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="end the run when the console is silent this long "
                            "(default: %(default)s)")
    guest.add_argument("--shell", action="store_true",
                       help="boot the kernel with an interactive root shell instead of testing")
    guest.add_argument("-v", "--verbose", action="store_true",
                       help="show the kernel console live, not only test output")

    tests = parser.add_argument_group("tests")
    tests.add_argument("-k", dest="keyword", metavar="EXPR",
                       help="pytest -k expression, passed to the guest")
    tests.add_argument("-m", dest="markers", metavar="MARKERS", default=pipeline.DEFAULT_MARKERS,
                       help="pytest -m expression (default: %(default)r)")
    tests.add_argument("--suite", type=Path, default=pipeline.DEFAULT_SUITE, metavar="DIR",
                       help="pytest directory run in the guest (default: this checkout's "
                            "selftests/)")

    where = parser.add_argument_group("files")
    where.add_argument("--output", type=Path, metavar="DIR",
                       help="artifact directory (default: ./runs/<UTC timestamp>)")
    where.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help=f"cache for sources, builds and ccache (default: ${CACHE_DIR_ENV} "
                            "or ~/.cache/sk-storage-selftests)")


def _version_key(version: str) -> tuple:
    return tuple(int(part) for part in version.split("."))


def options_from_args(args: argparse.Namespace, argv: Sequence[str]) -> pipeline.RunOptions:
    """Turn parsed run arguments into the pipeline's plain options value."""
    return pipeline.RunOptions(
        kernel_src=args.kernel_src, base=args.base, series=args.series, force=args.force,
        config=list(args.config), kernel_image=args.kernel_image, modules=args.modules,
        distro_kernel=args.distro_kernel, jobs=args.jobs, accel=args.accel, cpus=args.cpus,
        memory=args.memory, timeout=args.timeout, stall_timeout=args.stall_timeout,
        output=args.output, cache_dir=args.cache_dir, keyword=args.keyword,
        markers=args.markers or None, suite=args.suite, shell=args.shell,
        verbose=args.verbose, debug_kernel=args.debug_kernel, argv=list(argv),
        # Only the plain run's parser has the SSH-target and kept-guest options.
        target=remote.options_from_args(args) if hasattr(args, "target") else None,
        keep=getattr(args, "keep", False), stop=getattr(args, "stop", False),
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of a plain run (no subcommand)."""
    parser = argparse.ArgumentParser(
        prog="run-selftests",
        description="Build (or fetch) a kernel, boot it under virtme-ng/QEMU and run the "
                    "BPF sk local storage selftests in it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    remote.add_arguments(parser)
    keep.add_arguments(parser)
    return parser


def dispatch(argv: list[str]) -> int:
    """Run the subcommand named by argv[0], or the default pipeline."""
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        parser = argparse.ArgumentParser(prog=f"run-selftests {argv[0]}",
                                         description=module.__doc__,
                                         epilog=f"exit codes:\n{exit_code_table()}",
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        return int(module.main(parser.parse_args(argv[1:])))
    args = build_parser().parse_args(argv)
    return pipeline.run(options_from_args(args, argv))


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

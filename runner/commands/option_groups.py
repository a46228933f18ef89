"""The option groups commands compose, as kunit_tool's add_*_opts: a command offers what it can use.

Each add_* function adds one group (kernel, guest, tests, files, target) to a
parser, with keyword switches for the few options a command cannot honour; so an
option a command cannot use is never offered, and nothing is refused after
parsing.  options_from_args turns whatever a command composed into the
pipeline's RunOptions, with RunOptions' own defaults for what it did not offer;
command_line turns parsed options back into argv for a command that hands them on.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NoReturn

from runner.cache import CACHE_DIR_ENV
from runner.commands.pipeline import DEFAULT_MARKERS, DEFAULT_SUITE, RunOptions
from runner.errors import UsageError
from runner.stages.prebuilt import DISTRO_SUITES
from runner.targets import keep, remote

KERNEL_GROUP = "kernel to test (default: Debian 6.1 source + series)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are the runner's one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's group with this title, made on first use, so groups fill one heading."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def _version_key(version: str) -> tuple:
    return tuple(int(part) for part in version.split("."))


def add_tree_options(parser: argparse.ArgumentParser, *, kernel_src: bool = True,
                     base: bool = True) -> None:
    """Which kernel tree to build: --kernel-src DIR, --base REV."""
    kernel = _group(parser, KERNEL_GROUP)
    if kernel_src:
        kernel.add_argument("--kernel-src", type=Path, metavar="DIR",
                            help="your kernel tree (git or plain); built with no series unless "
                                 "--series is given")
    if base:
        kernel.add_argument("--base", metavar="REV",
                            help="build --kernel-src at REV in a separate worktree (git only)")


def add_build_options(parser: argparse.ArgumentParser, *, series: bool = True) -> None:
    """How the kernel is built: --series, --force, --config, --debug-kernel, -j."""
    kernel = _group(parser, KERNEL_GROUP)
    if series:
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
    kernel.add_argument("-j", "--jobs", type=int, default=RunOptions.jobs,
                        metavar="N", help="parallel make jobs (default: %(default)s, the core count)")


def add_prebuilt_options(parser: argparse.ArgumentParser) -> None:
    """A kernel that is not built: --kernel-image [--modules], --distro-kernel."""
    kernel = _group(parser, KERNEL_GROUP)
    kernel.add_argument("--kernel-image", type=Path, metavar="PATH",
                        help="boot this bzImage/vmlinuz instead of building")
    kernel.add_argument("--modules", type=Path, metavar="DIR",
                        help="lib/modules/<release> directory for --kernel-image")
    versions = sorted(DISTRO_SUITES, key=_version_key)
    kernel.add_argument("--distro-kernel", choices=versions, metavar="VERSION",
                        help=f"boot Debian's kernel for VERSION ({', '.join(versions)})")


def add_guest_options(parser: argparse.ArgumentParser, *, shell: bool = False) -> None:
    """The VM: --accel, --cpus, --memory, --timeout, --stall-timeout, -v, and --shell if asked."""
    guest = _group(parser, "guest")
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
    if shell:
        guest.add_argument("--shell", action="store_true",
                           help="boot the kernel with an interactive root shell instead of "
                                "testing")
    guest.add_argument("-v", "--verbose", action="store_true",
                       help="show the kernel console live, not only test output")


def add_test_options(parser: argparse.ArgumentParser, *, keyword: bool = True) -> None:
    """What pytest runs in the guest: -k, -m, --suite."""
    tests = _group(parser, "tests")
    if keyword:
        tests.add_argument("-k", dest="keyword", metavar="EXPR",
                           help="pytest -k expression, passed to the guest")
    tests.add_argument("-m", dest="markers", metavar="MARKERS", default=DEFAULT_MARKERS,
                       help="pytest -m expression (default: %(default)r)")
    tests.add_argument("--suite", type=Path, default=DEFAULT_SUITE, metavar="DIR",
                       help="pytest directory run in the guest (default: this checkout's "
                            "selftests/)")


def add_file_options(parser: argparse.ArgumentParser) -> None:
    """Where things go: --output, --cache-dir."""
    where = _group(parser, "files")
    where.add_argument("--output", type=Path, metavar="DIR",
                       help="artifact directory (default: ./runs/<UTC timestamp>)")
    where.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help=f"cache for sources, builds and ccache (default: ${CACHE_DIR_ENV} "
                            "or ~/.cache/sk-storage-selftests)")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """Somewhere other than a fresh VM: --target over SSH, --keep/--stop a long-lived guest."""
    remote.add_arguments(parser)
    keep.add_arguments(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every group, as the plain run (no subcommand) offers them."""
    add_tree_options(parser)
    add_build_options(parser)
    add_prebuilt_options(parser)
    add_guest_options(parser, shell=True)
    add_test_options(parser)
    add_file_options(parser)
    add_target_options(parser)


def options_from_args(args: argparse.Namespace, argv: Sequence[str]) -> RunOptions:
    """The pipeline's plain options from whatever groups the command composed."""
    given = vars(args)
    values = {f.name: given[f.name] for f in dataclasses.fields(RunOptions)
              if f.name in given and f.name not in ("argv", "target")}
    if "config" in values:
        values["config"] = list(values["config"])
    if "markers" in values:
        values["markers"] = values["markers"] or None
    target = remote.options_from_args(args) if "target" in given else None
    return RunOptions(**values, argv=list(argv), target=target)


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 skip: Collection[str] = ()) -> list[str]:
    """argv that parser parses back to args' values (those not at their default; paths absolute)."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        option = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(option)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [option, _text(item)]
        else:
            argv += [option, _text(value)]
    return argv


def _text(value: object) -> str:
    return str(Path(value).resolve()) if isinstance(value, Path) else str(value)

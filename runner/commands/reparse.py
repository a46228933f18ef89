"""Re-judge a saved run from its output directory (junit.xml, pytest-exitcode, console.log).

Like `kunit.py parse`: the verdict logic can be rerun offline, e.g. after a
splat pattern was added, without booting anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runner import record
from runner.commands import pipeline
from runner.errors import UsageError
from runner.stages import debug_kernel
from runner.stages.results import BootStatus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The output directory to re-judge."""
    parser.add_argument("output_dir", type=Path, help="a run's --output directory")


def main(args: argparse.Namespace) -> int:
    """Print the table and verdict of a saved run; the exit code is the verdict's."""
    out = args.output_dir
    if not out.is_dir():
        raise UsageError(f"{out} is not a directory; pass a run's output directory")
    # Without a record (a run that died before writing it) the files alone are judged.
    summary = record.read_if_present(out)
    boot_status = summary.boot.status if summary and summary.boot else BootStatus.EXITED
    # An SSH run may keep environment skips, a guest run may not: the same rule as the run.
    verdict, tests, splats, _ = pipeline.judge_output_dir(out, boot_status,
                                                          pipeline.target_kind(summary))
    if summary is not None and summary.kmemleak is not None:
        # A --debug-kernel run: its kmemleak report is part of the verdict.
        verdict, _ = debug_kernel.judge(out, verdict, print)
    pipeline.report(verdict, tests, splats, print)
    return int(verdict.exit_code)

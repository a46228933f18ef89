"""Re-judge a saved run from its output directory (junit.xml, pytest-exitcode, console.log).

Like `kunit.py parse`: the verdict logic can be rerun offline, e.g. after a
splat pattern was added, without booting anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runner import debug_kernel, pipeline
from runner.artifacts import SUMMARY
from runner.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The output directory to re-judge."""
    parser.add_argument("output_dir", type=Path, help="a run's --output directory")


def main(args: argparse.Namespace) -> int:
    """Print the table and verdict of a saved run; the exit code is the verdict's."""
    out = args.output_dir
    if not out.is_dir():
        raise UsageError(f"{out} is not a directory; pass a run's output directory")
    boot_status = "exited"
    summary: dict = {}
    summary_file = out / SUMMARY
    if summary_file.exists():
        try:
            summary = json.loads(summary_file.read_text())
            boot_status = summary.get("boot", {}).get("status", boot_status)
        except ValueError:
            pass
    # An SSH run may keep environment skips, a guest run may not: the same rule as the run.
    verdict, tests, splats, _ = pipeline.judge_output_dir(out, boot_status,
                                                          pipeline.target_kind(summary))
    if "kmemleak" in summary:
        # A --debug-kernel run: its kmemleak report is part of the verdict.
        verdict = debug_kernel.judge(out, verdict, {}, print)
    pipeline.report(verdict, tests, splats, print)
    return int(verdict.exit_code)

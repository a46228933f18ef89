"""bench-loop's table: medians, ranges and targets from real-shaped samples."""

from __future__ import annotations

import argparse

import pytest

from runner.commands import bench_loop
from runner.errors import UsageError


def test_a_row_takes_the_median_and_range_and_judges_the_target():
    samples = [{"wall": 30.0, "timings": {"guest": 19.0}},
               {"wall": 22.0, "timings": {"guest": 18.0}},
               {"wall": 24.0, "timings": {"guest": 25.0}}]
    warm = bench_loop.row("warm", samples, "wall", 25)
    assert warm == {"loop": "warm", "median": 24.0, "min": 22.0, "max": 30.0, "n": 3,
                    "target": 25, "met": True}
    guest = bench_loop.row("guest", samples, "guest", 18)
    assert guest["median"] == 19.0 and guest["met"] is False
    # A stage a failed run never reached is left out, not counted as zero.
    assert bench_loop.row("build", samples, "build", None)["n"] == 0


def test_the_table_marks_misses_and_carries_notes():
    rows = [bench_loop.row("warm", [{"wall": 20.0}], "wall", 25),
            bench_loop.row("edit", [{"wall": 50.0}], "wall", 45),
            {**bench_loop.row("checkout", [{"wall": 21.0}], "wall", None),
             "note": "same build directory, make skipped (0 make steps)"}]
    table = bench_loop.format_table(rows, "2 cores")
    assert "| warm | 20.0 s | 20.0-20.0 s | 1 | <= 25 s | yes |" in table
    assert "| edit | 50.0 s | 50.0-50.0 s | 1 | <= 45 s | **no** |" in table
    assert "| checkout | 21.0 s | 21.0-21.0 s | 1 |  | same build directory, make skipped" in table


def test_unknown_loops_are_a_usage_error(tmp_path):
    args = argparse.Namespace(output=tmp_path, runs=1, loops="warm,nap", cache_dir=tmp_path)
    with pytest.raises(UsageError, match="unknown loop nap"):
        bench_loop.main(args)

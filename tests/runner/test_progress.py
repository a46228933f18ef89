"""The end-of-run timing line and the throttled status line."""

from __future__ import annotations

import io

from runner import progress


def test_timings_read_in_pipeline_order_with_the_banner_under_the_guest():
    timings = {"total": 48.3, "guest": 38.0, "build": 8.0, "config": 1.0, "source": 0.4,
               "patches": 0.3, "kernel_banner": 4.2}
    assert progress.format_timings(timings) == (
        "timings: source 0.4 s, patches 0.3 s, config 1.0 s, build 8.0 s, "
        "guest 38.0 s (kernel banner at 4.2 s), other 0.6 s, total 48.3 s")


def test_a_failed_run_shows_the_stages_it_reached_and_unknown_stages_last():
    assert progress.format_timings({"source": 1.0, "zeta": 2.0, "total": 3.0}) == (
        "timings: source 1.0 s, zeta 2.0 s, total 3.0 s")
    assert progress.format_timings({}) == "timings: none recorded"


def test_a_status_line_off_a_terminal_is_throttled():
    stream = io.StringIO()
    line = progress.StatusLine(stream, interval=60)
    line.update("build: 00:01 1 steps")
    line.update("build: 00:02 2 steps")
    line.finish("build: done")
    assert stream.getvalue() == "build: 00:01 1 steps\nbuild: done\n"

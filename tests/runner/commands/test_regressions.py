"""Kernel-free tests of `run-selftests regressions`: manifest, shared build key, verdicts, table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import TESTS

from runner.commands import cli, option_groups, pipeline, regression_verdict, regressions
from runner.commands.regression_verdict import (
    CAUGHT,
    CAUGHT_CRASH,
    ERROR,
    MISSED,
    SILENT_DEATH,
    Outcome,
    evaluate,
    matches,
    node_id,
    running_test,
)
from runner.errors import ExitCode, UsageError
from runner.stages import build, results
from runner.stages.patches import load_series

FIXTURES = TESTS / "fixtures"
OOPS = (FIXTURES / "splats" / "oops-null-deref-6.1-qemu.log").read_text()
JUNIT = FIXTURES / "runner" / "junit-guest-6.1.xml"


def tr(name: str, outcome: str = "failed") -> results.TestResult:
    return results.TestResult(name, outcome, "", 0.1)


def splats_of(text: str) -> list:
    return results.find_console_splats(text)


# --- names ---------------------------------------------------------------------------------


def test_manifest_node_ids_match_junit_names_and_their_parametrizations():
    assert matches("test_teardown.py::test_closing_the_child_keeps_the_listeners_storage",
                   "test_teardown::test_closing_the_child_keeps_the_listeners_storage[ipv6]")
    assert matches("test_prog.py::test_tcp_sockets_get_storage_from_their_own_egress[ipv4]",
                   "test_prog::test_tcp_sockets_get_storage_from_their_own_egress[ipv4]")
    assert not matches("test_prog.py::test_tcp_sockets_get_storage_from_their_own_egress[ipv4]",
                       "test_prog::test_tcp_sockets_get_storage_from_their_own_egress[ipv6]")
    # A whole module, and a node id spelled by pytest -v in the console.
    assert matches("test_map_free.py", "test_map_free.py::test_open_iterator_keeps_its_map_alive")


def test_a_name_is_matched_as_a_whole_identifier_not_as_a_prefix():
    assert not matches("test_fd_ops.py::test_update", "test_fd_ops::test_update_lookup_delete")
    assert not matches("test_fd_ops.py::test_update", "test_fd_ops::pre_test_update")
    assert not matches("test_teardown.py::test_x", "test_prog::test_x")


def test_junit_names_become_pytest_node_ids():
    assert node_id("test_teardown::test_x[ipv4]") == "test_teardown.py::test_x[ipv4]"
    assert node_id("test_teardown.TestClone::test_x") == "test_teardown.py::TestClone::test_x"
    assert node_id("bench.test_speed::test_y") == "bench/test_speed.py::test_y"
    assert node_id("plain") == "plain"


def test_every_name_of_a_real_junit_file_round_trips_through_node_id():
    for test in results.parse_junit(JUNIT):
        assert matches(node_id(test.name), test.name)


# --- which test was running ----------------------------------------------------------------

CONSOLE = """\
test_btf.py::test_without_btf_is_einval PASSED                           [  0%]
test_fd_ops.py::test_update_lookup_delete_round_trip[udp] PASSED         [ 20%]
test_fd_ops.py::test_update_lookup_delete_round_trip[tcp] """


def test_the_running_test_is_the_last_node_id_without_a_result():
    lines = (CONSOLE + "\n" + OOPS).splitlines()
    assert running_test(lines, 3) == "test_fd_ops.py::test_update_lookup_delete_round_trip[tcp]"
    assert running_test(lines, 1) is None  # line 1 says PASSED


def test_a_report_glued_to_the_node_id_line_is_charged_to_that_test():
    text = CONSOLE + OOPS
    lines = text.splitlines()
    splat = splats_of(text)[0]
    assert splat.line == 2
    assert running_test(lines, splat.line) == \
        "test_fd_ops.py::test_update_lookup_delete_round_trip[tcp]"


def test_nothing_runs_after_the_session_summary():
    text = ("test_x.py::test_a PASSED [100%]\n"
            "=========================== short test summary info ============================\n"
            "FAILED test_x.py::test_b - AssertionError\n" + OOPS)
    lines = text.splitlines()
    assert running_test(lines, len(lines) - 1) is None


# --- verdicts --------------------------------------------------------------------------------

EXPECTED = ["test_teardown.py::test_accepted_child_inherits_only_clone_maps",
            "test_prog.py::test_tcp_sockets_get_storage_from_their_own_egress[ipv4]"]


def test_caught_when_an_expected_test_failed():
    tests = [tr("test_btf::test_a", "passed"),
             tr("test_teardown::test_accepted_child_inherits_only_clone_maps[ipv6]"),
             tr("test_map_free::test_other")]
    found = evaluate(EXPECTED, tests, "exited", [], "")
    assert found["caught"] == CAUGHT
    assert found["matched"] == EXPECTED[:1]
    assert found["observed"] == [
        "test_teardown.py::test_accepted_child_inherits_only_clone_maps[ipv6]",
        "test_map_free.py::test_other"]


def test_an_expected_test_with_an_error_counts_too():
    found = evaluate(EXPECTED, [tr("test_prog::test_tcp_sockets_get_storage_from_their_own_"
                                   "egress[ipv4]", "error")], "exited", [], "")
    assert found["caught"] == CAUGHT


def test_other_failures_alone_are_not_a_catch():
    found = evaluate(EXPECTED, [tr("test_prog::test_tcp_sockets_get_storage_from_their_own_"
                                   "egress[ipv6]")], "exited", [], "")
    assert found["caught"] == MISSED
    assert "does not expect" in found["note"]


def test_a_splat_that_no_test_was_charged_with_is_not_a_catch():
    found = evaluate(EXPECTED, [tr("test_btf::test_a", "passed")], "exited", splats_of(OOPS),
                     OOPS)
    assert found["caught"] == MISSED
    assert "oops at console line 1" in found["note"] and "not charged" in found["note"]


def test_all_green_is_a_miss():
    found = evaluate(EXPECTED, [tr("test_btf::test_a", "passed")], "exited", [], "")
    assert found == {"caught": MISSED, "observed": [], "matched": [], "crash": None,
                     "crash_in_expected": None, "note": "every test passed"}


def test_a_guest_that_oopsed_during_an_expected_test_is_a_crash_catch():
    text = ("test_teardown.py::test_accepted_child_inherits_only_clone_maps[ipv4] \n" + OOPS)
    found = evaluate(EXPECTED, None, "exited", splats_of(text), text)
    assert found["caught"] == CAUGHT_CRASH
    assert found["crash_in_expected"] is True
    assert found["crash"].startswith("guest died before pytest finished: oops (console line 2)")


def test_a_crash_in_a_test_the_manifest_does_not_list_is_a_catch_flagged_as_such():
    text = CONSOLE + OOPS
    found = evaluate(["test_teardown.py::test_closed_sockets_leave_no_storage_in_the_map"],
                     None, "stalled", splats_of(text), text)
    assert found["caught"] == CAUGHT_CRASH
    assert found["crash_in_expected"] is False
    assert found["observed"] == ["test_fd_ops.py::test_update_lookup_delete_round_trip[tcp]"]
    assert "guest stalled" in found["crash"]


def test_a_guest_that_died_without_a_report_in_a_test_is_a_silent_death():
    found = evaluate(EXPECTED, None, "timeout", [], CONSOLE)
    assert found["caught"] == SILENT_DEATH
    assert "no kernel report" in found["note"]
    after = "=== 3 passed in 1.00s ===\n" + OOPS
    found = evaluate(EXPECTED, None, "exited", splats_of(after), after)
    assert found["caught"] == SILENT_DEATH and "outside any test" in found["note"]


def test_a_run_that_never_booted_is_an_error():
    found = evaluate(EXPECTED, None, None, [], "", "patch regression.patch does not apply")
    assert found["caught"] == ERROR and "does not apply" in found["note"]


# --- table and exit code ----------------------------------------------------------------------


def outcome(caught: str, **kw) -> Outcome:
    base = {"id": "r1", "bug": "a | bug", "upstream_fix": 'abc123 ("fix")',
            "expected": ["t.py::x"], "caught": caught}
    base.update(kw)
    return Outcome(**base)


def test_the_markdown_table_has_one_row_per_regression_and_a_count():
    rows = [outcome(CAUGHT, observed=["t.py::x"], seconds=125, build_seconds=90,
                    guest_seconds=30),
            outcome(CAUGHT_CRASH, id="r2", crash="guest died: oops during u.py::y",
                    crash_in_expected=False, runner_args=["--cpus", "1"]),
            outcome(MISSED, id="r3", note="every test passed")]
    text = regression_verdict.markdown(rows)
    lines = text.splitlines()
    assert lines[2] == ("| regression | bug | fix | expected failing | failing tests observed "
                        "| caught | time |")
    assert "| r1 | a \\| bug |" in text and "2m05s (build 90 s, guest 30 s)" in text
    assert "| r2 (`--cpus 1`) |" in text and "**yes (crash), not an expected test**" in text
    assert "none (every test passed) | **no** |" in text
    assert "2 of 3 caught." in text


def test_exit_code_prefers_a_broken_run_then_a_miss():
    assert regressions.exit_code([outcome(CAUGHT), outcome(CAUGHT_CRASH)]) == ExitCode.PASS
    assert regressions.exit_code([outcome(CAUGHT), outcome(MISSED)]) == ExitCode.TEST_FAILURE
    assert regressions.exit_code([outcome(MISSED), outcome(ERROR, exit_code=6)]) == 6


# --- manifest, selection, shared build directory ---------------------------------------------


def test_the_project_manifest_loads_and_every_patch_exists():
    corpus = regressions.load_manifest()
    assert len(corpus) >= 6
    assert all(r.patch.is_file() and r.expected_failing for r in corpus)
    single = [r for r in corpus if r.id == "single-bucket-out-of-bounds"]
    assert single and single[0].runner_args == ("--cpus", "1")


@pytest.mark.parametrize("entries, message", [
    ("{}", "JSON list"),
    ('[{"id": "a", "patch": "p.patch", "bug": "b"}]', "lacks expected_failing"),
    ('[{"id": "a", "patch": "missing.patch", "bug": "b", "expected_failing": ["x"]}]',
     "does not exist"),
    (('[{"id": "a", "patch": "p.patch", "bug": "b", "expected_failing": ["x"]},'
      ' {"id": "a", "patch": "p.patch", "bug": "b", "expected_failing": ["x"]}]'), "used twice"),
    ('[{"id": "a", "patch": "p.patch", "bug": "b", "expected_failing": "x"}]', "list of"),
    ("[", "not valid JSON"),
])
def test_a_broken_manifest_is_a_usage_error(tmp_path, entries, message):
    (tmp_path / "p.patch").write_text("")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(entries)
    with pytest.raises(UsageError, match=message):
        regressions.load_manifest(manifest)


def test_only_takes_ids_and_patch_numbers_and_keeps_manifest_order():
    corpus = regressions.load_manifest()
    picked = regressions.select(corpus, "sk-storage-iter-does-not-pin-map,05")
    assert [r.patch.name[:2] for r in picked] == ["05", "07"]
    with pytest.raises(UsageError, match="no regression nope"):
        regressions.select(corpus, "nope")


def test_every_regression_gets_the_same_build_directory_key(tmp_path):
    corpus = regressions.load_manifest()
    source = tmp_path / "linux"
    keys, texts = set(), set()
    for regression in corpus:
        series_file = regressions.prepare_slot_series(tmp_path / "slot", pipeline.DEFAULT_SERIES,
                                                      regression.patch)
        series = load_series(series_file)
        assert series.entries[-1].path == regression.patch
        keys.add(build.build_key(source, series, list(pipeline.DEFAULT_FRAGMENTS))[0])
        texts.add(series_file.read_text())
    assert len(keys) == 1 and len(texts) == 1
    # ...and it is not the default build directory's key.
    default = build.build_key(source, load_series(pipeline.DEFAULT_SERIES),
                              list(pipeline.DEFAULT_FRAGMENTS))[0]
    assert default not in keys


def parse_regressions_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    regressions.add_arguments(parser)
    return parser.parse_args(argv)


def test_runner_args_of_an_entry_override_the_command_line_and_keep_the_rest(tmp_path):
    args = parse_regressions_args(["--cpus", "2", "--memory", "3G", "-k", "teardown",
                                   "--config", str(tmp_path / "x.config")])
    entry = regressions.Regression("r", tmp_path / "p.patch", "bug", "fix", ("t",),
                                   ("--cpus", "1", "--config", str(tmp_path / "y.config")))
    options = regressions.options_for(args, entry, tmp_path / "series", tmp_path / "out")
    assert options.cpus == 1 and options.memory == "3G" and options.keyword == "teardown"
    assert options.config == [tmp_path / "x.config", tmp_path / "y.config"]
    assert options.series == tmp_path / "series" and options.output == tmp_path / "out"
    assert list(options.argv) == ["regressions", "--only", "r"]
    assert args.config == [tmp_path / "x.config"]  # the command line's options are untouched


def test_runner_args_that_are_not_run_options_are_a_usage_error(tmp_path):
    args = parse_regressions_args([])
    entry = regressions.Regression("r", tmp_path / "p.patch", "bug", "fix", ("t",),
                                   ("--no-such-option",))
    with pytest.raises(UsageError, match="runner_args"):
        regressions.options_for(args, entry, tmp_path / "series", tmp_path / "out")


@pytest.mark.parametrize("option", [["--kernel-src", "k"], ["--base", "v6.1"], ["--series", "s"],
                                    ["--kernel-image", "i"], ["--modules", "m"],
                                    ["--distro-kernel", "6.1"], ["--shell"], ["--target", "t"]])
def test_options_that_pick_another_kernel_are_not_offered(option):
    # A regression always builds the default source + series + its patch.
    parser = option_groups.Parser(prog="run-selftests regressions")
    regressions.add_arguments(parser)
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parser.parse_args(option)


def test_the_subcommand_parses_its_own_and_the_run_options():
    # cli.dispatch builds the subcommand's parser from add_arguments, as here.
    assert cli.SUBCOMMANDS["regressions"] == "runner.commands.regressions"
    args = parse_regressions_args(["--only", "05", "--debug-kernel"])
    assert args.only == "05" and args.debug_kernel
    assert option_groups.options_from_args(args, []).debug_kernel


# --- from saved run directories ---------------------------------------------------------------


def saved_run(out: Path, *, junit: bool, console: str, boot: str = "exited",
              verdict: str = "test failure") -> None:
    out.mkdir(parents=True)
    (out / "console.log").write_text(console)
    summary = {"schema_version": 2, "boot": {"status": boot}, "verdict": verdict, "reason": "r",
               "exit_code": 1,
               "timings": {"build": 80.0, "guest": 200.0, "total": 300.0}}
    (out / "summary.json").write_text(json.dumps(summary))
    if junit:
        (out / "junit.xml").write_text(JUNIT.read_text())
        (out / "pytest-exitcode").write_text("1\n")


def test_outcome_from_a_saved_run_reads_its_junit(tmp_path):
    failed = [t for t in results.parse_junit(JUNIT) if t.outcome in ("failed", "error")]
    expected = node_id(failed[0].name) if failed else "test_btf.py::test_without_btf_is_einval"
    saved_run(tmp_path / "r", junit=True, console="")
    entry = regressions.Regression("r", tmp_path / "p.patch", "bug", "fix", (expected,))
    row = regressions.outcome_from_dir(entry, tmp_path / "r")
    assert row.caught == (CAUGHT if failed else MISSED)
    assert row.seconds == 300.0 and row.build_seconds == 80.0 and row.guest_seconds == 200.0


def test_outcome_from_a_saved_crash_attributes_the_console(tmp_path):
    saved_run(tmp_path / "r", junit=False, console=CONSOLE + OOPS, verdict="kernel splat")
    entry = regressions.Regression(
        "r", tmp_path / "p.patch", "bug", "fix",
        ("test_fd_ops.py::test_update_lookup_delete_round_trip",), ("--cpus", "1"))
    row = regressions.outcome_from_dir(entry, tmp_path / "r", seconds=12.0)
    assert row.caught == CAUGHT_CRASH and row.crash_in_expected is True
    assert row.seconds == 12.0 and row.runner_args == ["--cpus", "1"]


def test_outcome_of_a_run_that_stopped_before_booting_is_an_error(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"schema_version": 2, "verdict": "error", "exit_code": 5,
                                                  "reason": "kernel build failed"}))
    entry = regressions.Regression("r", tmp_path / "p.patch", "bug", "fix", ("t",))
    row = regressions.outcome_from_dir(entry, out)
    assert row.caught == ERROR and row.note == "kernel build failed"
    assert regressions.exit_code([row]) == 5


# --- real runs -------------------------------------------------------------------------------

REAL = FIXTURES / "regressions"


def test_a_real_stalled_guest_after_an_expected_failure_is_caught_from_the_console():
    text = (REAL / "spin-lock-02-stalled-console.log").read_text()
    expected = ["test_spin_lock.py::test_user_lock_word_never_reaches_the_kernel"]
    found = evaluate(expected, None, "stalled", splats_of(text), text)
    assert found["caught"] == CAUGHT
    assert found["observed"] == [
        "test_spin_lock.py::test_user_lock_word_never_reaches_the_kernel[plain-update]"]
    assert found["crash"] == ("guest stalled during test_spin_lock.py::"
                              "test_user_lock_word_never_reaches_the_kernel[locked-update]")
    # Had the hung test been another one, the same console is a silent death, never a pass.
    found = evaluate(["test_teardown.py::test_x"], None, "stalled", splats_of(text), text)
    assert found["caught"] == SILENT_DEATH
    assert "no kernel report" in found["note"]


def test_console_progress_reads_every_result_of_a_real_run():
    lines = (REAL / "spin-lock-02-stalled-console.log").read_text().splitlines()
    progress = regression_verdict.console_progress(lines)
    assert len(progress.results) == 136 and not progress.finished
    assert {result for _, result in progress.results} == {"PASSED", "FAILED"}
    assert progress.running.endswith("[locked-update]")


def test_a_real_oops_glued_to_the_running_node_id_is_a_crash_catch_in_that_test():
    text = (REAL / "single-bucket-05-oops-console.log").read_text()
    expected = ["test_fd_ops.py::test_update_lookup_delete_round_trip",
                "test_teardown.py::test_closed_sockets_leave_no_storage_in_the_map"]
    splats = splats_of(text)
    assert splats[0].kind == "oops"
    found = evaluate(expected, None, "exited", splats, text)
    assert found["caught"] == CAUGHT_CRASH and found["crash_in_expected"] is True
    assert found["matched"] == expected[:1]
    assert found["crash"] == (f"guest died before pytest finished: oops (console line "
                              f"{splats[0].line + 1}) during "
                              "test_fd_ops.py::test_update_lookup_delete_round_trip[tcp-ipv4]")


def test_a_miss_shows_what_else_made_the_run_red(tmp_path):
    saved_run(tmp_path / "r", junit=True, console="", verdict="kmemleak")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    summary["reason"] = "71 leaked object(s) allocated through BPF local storage"
    (tmp_path / "r" / "summary.json").write_text(json.dumps(summary))
    entry = regressions.Regression("r", tmp_path / "p.patch", "bug", "fix", ("t.py::nothing",))
    row = regressions.outcome_from_dir(entry, tmp_path / "r")
    assert row.caught == MISSED
    assert row.note.endswith("; the run's verdict: kmemleak (71 leaked object(s) allocated "
                             "through BPF local storage)")

"""run-selftests matrix without booting: kernel specs, run options, and the test x kernel table.

Fixtures are files real matrix runs left: summary.json of Debian 5.10 (seven failures) and
6.12 (all pass), the summary of a 7.2 run that never booted (error, no tests), and the
junit.xml of Debian 6.1 (four failures).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from conftest import TESTS

from runner.commands import matrix, pipeline
from runner.errors import UsageError

FIXTURES = TESTS / "fixtures" / "matrix"


def test_default_kernels_are_the_four_distro_releases():
    specs = matrix.parse_kernels(matrix.DEFAULT_KERNELS)
    assert [s.label for s in specs] == ["distro 5.10", "distro 6.1", "distro 6.12", "distro 7.2"]
    assert [s.slug for s in specs] == ["distro-5.10", "distro-6.1", "distro-6.12", "distro-7.2"]


def test_build_and_image_specs_are_named_after_the_path():
    specs = matrix.parse_kernels("build:/src/linux-next/, image:/boot/vmlinuz-6.1.0-50-amd64")
    assert [s.label for s in specs] == ["build linux-next", "image vmlinuz-6.1.0-50-amd64"]
    assert specs[1].text() == "image:/boot/vmlinuz-6.1.0-50-amd64"


@pytest.mark.parametrize("text", ["distro", "kvm:6.1", "image:", "", "distro:6.1,distro:6.1"])
def test_malformed_or_repeated_kernels_are_usage_errors(text):
    with pytest.raises(UsageError):
        matrix.parse_kernels(text)


def test_distro_kernel_run_drops_build_only_options(tmp_path):
    base = pipeline.RunOptions(series=Path("s"), config=[Path("c")], base="v6.1", keyword="prog")
    spec = matrix.KernelSpec("distro", "5.10")
    options = matrix.options_for(base, spec, tmp_path)
    assert (options.distro_kernel, options.kernel_src, options.output) == ("5.10", None, tmp_path)
    assert (options.series, options.config, options.base) == (None, [], None)
    # The kernel's summary.json gets a reproducer for exactly this kernel.
    assert list(options.argv) == ["--distro-kernel", "5.10", "-k", "prog"]


def test_build_kernel_run_keeps_the_series():
    base = pipeline.RunOptions(series=Path("s"))
    options = matrix.options_for(base, matrix.KernelSpec("build", "/src/linux"), Path("/o"))
    assert (options.kernel_src, options.series) == (Path("/src/linux"), Path("s"))


def test_column_from_a_failing_run():
    column = matrix.column_from_dir(matrix.KernelSpec("distro", "5.10"), FIXTURES / "distro-5.10")
    assert column.release == "5.10.0-32-amd64"
    assert column.verdict == "test failure"
    assert column.counts == {"passed": 155, "failed": 7, "error": 0, "skipped": 0, "xfailed": 0,
                             "skipped_by_category": {}}
    assert column.accel == "tcg"


def test_column_of_a_run_that_never_booted_has_no_tests():
    column = matrix.column_from_dir(matrix.KernelSpec("distro", "7.2"), FIXTURES / "distro-7.2")
    assert (column.verdict, column.tests) == ("error", None)
    assert "no boot/vmlinuz" in column.reason


def test_column_without_any_file_says_the_run_never_started(tmp_path):
    column = matrix.column_from_dir(matrix.KernelSpec("distro", "6.1"), tmp_path)
    assert column.tests is None and "never started" in column.reason


def test_column_falls_back_to_junit_when_the_summary_has_no_tests(tmp_path):
    shutil.copy(FIXTURES / "junit-distro-6.1.xml", tmp_path / "junit.xml")
    (tmp_path / "summary.json").write_text(json.dumps({"schema_version": 2, "verdict": "crash",
                                                                 "tests": []}))
    column = matrix.column_from_dir(matrix.KernelSpec("distro", "6.1"), tmp_path)
    assert column.verdict == "crash"
    assert column.counts["failed"] == 4 and column.counts["passed"] == 158


def _columns(tmp_path: Path) -> list[matrix.KernelColumn]:
    six_one = tmp_path / "distro-6.1"
    six_one.mkdir()
    shutil.copy(FIXTURES / "junit-distro-6.1.xml", six_one / "junit.xml")
    specs = matrix.parse_kernels(matrix.DEFAULT_KERNELS)
    dirs = [FIXTURES / "distro-5.10", six_one, FIXTURES / "distro-6.12", FIXTURES / "distro-7.2"]
    return [matrix.column_from_dir(spec, d) for spec, d in zip(specs, dirs)]


def test_matrix_json_has_one_outcome_per_test_and_kernel(tmp_path):
    built = matrix.build_matrix(_columns(tmp_path))
    assert [k["label"] for k in built["kernels"]][-1] == "distro 7.2"
    assert [k["has_results"] for k in built["kernels"]] == [True, True, True, False]
    by_name = {t["name"]: t["results"] for t in built["tests"]}
    clone = by_name["test_teardown::test_failed_clone_leaves_the_listeners_storage[ipv4]"]
    assert {k: v["outcome"] for k, v in clone.items()} == {
        "distro 5.10": "failed", "distro 6.1": "failed", "distro 6.12": "passed"}
    assert "ENOENT" in clone["distro 5.10"]["message"]
    assert len(built["tests"]) == 162


def test_summary_markdown_shows_only_non_passing_rows_with_numbered_notes(tmp_path):
    text = matrix.markdown(matrix.build_matrix(_columns(tmp_path)), only_non_passing=True)
    rows = [line for line in text.splitlines() if line.startswith("| test_")]
    assert len(rows) == 7
    assert ("| test_teardown::test_failed_clone_leaves_the_listeners_storage[ipv4] | "
            "**FAIL** [5] | **FAIL** [5] | pass | n/a |") in rows
    assert "| *155 more tests: pass on every kernel* |" in text
    # The same message is one note, numbered once.
    assert text.count("[5] bpfkit.syscall.BpfError: BPF_MAP_LOOKUP_ELEM failed: ENOENT") == 1
    assert "n/a: that kernel's run produced no test results" in text


def test_full_markdown_lists_every_test(tmp_path):
    text = matrix.markdown(matrix.build_matrix(_columns(tmp_path)))
    assert sum(line.startswith("| test_") for line in text.splitlines()) == 162


def test_kernel_table_names_release_origin_and_why_a_kernel_failed(tmp_path):
    text = matrix.markdown(matrix.build_matrix(_columns(tmp_path)))
    lines = text.splitlines()
    assert lines[0].startswith("| kernel | release | origin | verdict |")
    assert lines[2].startswith("| distro 5.10 | 5.10.0-32-amd64 | Debian bullseye "
                               "linux-image-5.10.0-32-amd64 5.10.223-1 | test failure: 7 test(s)")
    assert "| distro 7.2 | ? |  | error: linux-image-7.2.13+deb14-amd64 has no boot" in text


def test_pipes_in_test_ids_do_not_break_the_table():
    column = matrix.KernelColumn(matrix.KernelSpec("distro", "6.1"), "/o", verdict="pass")
    column.tests = []
    built = matrix.build_matrix([column])
    built["tests"] = [{"name": "t[NOEXIST|EXIST]", "results": {"distro 6.1": {
        "outcome": "skipped", "message": "a | b"}}}]
    text = matrix.markdown(built)
    assert "| t[NOEXIST\\|EXIST] | skip [1] |" in text
    assert "[1] a \\| b" in text


def test_from_dir_rebuilds_the_tables_offline(tmp_path):
    out = tmp_path / "matrix"
    columns = _columns(tmp_path)
    for column in columns:
        shutil.copytree(column.output_dir, out / column.spec.slug)
    (out / matrix.MATRIX_JSON).write_text(json.dumps(matrix.build_matrix(columns)))
    lines: list[str] = []
    args = argparse.Namespace(from_dir=out)
    # 5.10 failed tests (1), 6.12 passed, 7.2 never booted (7): the matrix cannot vouch for
    # every kernel, so it reports the infrastructure problem.
    assert matrix.main(args, log=lines.append) == 7
    assert (out / matrix.MATRIX_MD).exists() and (out / matrix.SUMMARY_MD).exists()
    assert any("**FAIL** [5]" in line for line in "\n".join(lines).splitlines())

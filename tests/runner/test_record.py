"""summary.json through runner.record: the one writer, the one reader, old and foreign schemas."""

from __future__ import annotations

import json

import pytest
from conftest import TESTS

from runner import record
from runner.errors import ExitCode, UsageError
from runner.stages import results
from runner.stages.results import BootStatus, VerdictLabel

FIXTURES = TESTS / "fixtures"
# Real summaries written by schema 1 runners: a failed run, a pass, an early error.
V1_RUNS = [FIXTURES / "ci" / "tcg-one-failure", FIXTURES / "matrix" / "distro-6.12",
           FIXTURES / "matrix" / "distro-7.2"]


def test_a_written_record_reads_back_equal_with_its_schema_version(tmp_path):
    written = record.RunRecord(
        command=["run-selftests", "-k", "x"], kernel={"release": "6.1.0"},
        timings={"guest": 20.5}, target_kind="vm",
        accel=record.AccelRecord("tcg", "no /dev/kvm", ["kvm: absent"]),
        boot=record.BootRecord(BootStatus.EXITED, "guest exited with status 0", ["vng"], 0),
        tests=[results.TestResult("m::t", "failed", "boom", 0.5)],
        splats=[record.SplatRecord("oops", 12, "Oops: 0000")],
        verdict=VerdictLabel.TEST_FAILURE, reason="1 test(s) failed: t", exit_code=1)
    record.write(tmp_path, written)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["schema_version"] == record.SCHEMA_VERSION and "schema" not in data
    # Field names and plain-string statuses as the README and CI scripts read them.
    assert data["boot"]["status"] == "exited" and data["verdict"] == "test failure"
    assert data["tests"][0] == {"name": "m::t", "outcome": "failed", "message": "boom",
                                "seconds": 0.5}
    assert "kmemleak" not in data  # unset fields are left out, as before
    assert record.read(tmp_path) == written
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("run", V1_RUNS, ids=lambda p: p.name)
def test_schema_1_records_are_migrated_on_read(run):
    raw = json.loads((run / "summary.json").read_text())
    assert raw["schema"] == 1
    read = record.read(run)
    assert read.verdict == raw["verdict"] and read.exit_code == raw["exit_code"]
    assert isinstance(read.verdict, VerdictLabel)
    if "boot" in raw:
        assert read.boot.status == raw["boot"]["status"]
        assert len(read.tests) == len(raw["tests"])
    # Written again, it is a current record holding the same facts.
    assert record.parse(read.to_dict()) == read


@pytest.mark.parametrize("data, says", [
    ({"schema_version": 3, "verdict": "pass"}, "has schema 3"),
    ({"verdict": "pass", "exit_code": 0}, "has schema None"),
    ([1, 2], "not a run record"),
    ({"schema_version": 2, "verdict": "green"}, "not a valid schema 2 run record"),
    ({"schema_version": 2, "boot": {"status": "melted"}}, "'melted' is not a valid BootStatus"),
    ({"schema_version": 2, "colour": "red"}, "unknown field(s) colour"),
])
def test_anything_else_is_one_line_naming_the_file(tmp_path, data, says):
    (tmp_path / "summary.json").write_text(json.dumps(data))
    with pytest.raises(record.RecordError) as raised:
        record.read(tmp_path)
    assert says in raised.value.message and str(tmp_path / "summary.json") in raised.value.message
    assert "\n" not in raised.value.message
    assert isinstance(raised.value, UsageError) and raised.value.exit_code == ExitCode.USAGE


def test_not_json_and_absent_files(tmp_path):
    assert record.read_if_present(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        record.read(tmp_path)
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(record.RecordError, match="is not JSON"):
        record.read_if_present(tmp_path)


def test_status_words_format_as_their_plain_strings():
    # f-strings, str() and JSON must all give the word, never "VerdictLabel.PASS".
    assert f"{VerdictLabel.KERNEL_SPLAT}" == str(VerdictLabel.KERNEL_SPLAT) == "kernel splat"
    assert json.dumps([BootStatus.STALLED]) == '["stalled"]'
    assert VerdictLabel.PASS.upper() == "PASS" and BootStatus("panic") is BootStatus.PANIC

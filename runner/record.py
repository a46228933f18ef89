"""summary.json, the run record: its typed shape, the one writer and the one reader.

Every command that runs a guest writes a RunRecord here; every consumer
(`parse`, matrix, regressions, bisect, the CI scripts) reads it back through
read(), so a record of another schema fails the same way everywhere: one
line naming the file and what to do.

Schema history: 1 carried the version as "schema"; 2 names it
"schema_version" and is otherwise the same, so a version 1 record is read by
renaming that one key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import atomic_file
from runner.errors import UsageError
from runner.stages.artifacts import SUMMARY
from runner.stages.results import BootStatus, TestResult, VerdictLabel

SCHEMA_VERSION = 2
# Older schemas read() still accepts, each with the step that brings it to the next.
_MIGRATIONS = {1: lambda data: {**{k: v for k, v in data.items() if k != "schema"},
                                "schema_version": 2}}


class RecordError(UsageError):
    """A summary.json that is not a run record this version can read."""


@dataclass
class BootRecord:
    """How the guest or SSH target run ended."""

    status: BootStatus
    detail: str = ""
    command: list[str] | None = None
    exit_status: int | None = None


@dataclass
class AccelRecord:
    """The accelerator a guest ran under, why, and the KVM attempts before it."""

    used: str
    reason: str = ""
    attempts: list[str] = field(default_factory=list)
    kvm_memo: str | None = None


@dataclass
class SplatRecord:
    """One kernel splat found in console.log."""

    kind: str
    line: int | None = None
    excerpt: str = ""


@dataclass
class RunRecord:
    """Everything summary.json says about one run; None fields are left out of the file.

    A run that ends early fills only what it reached: a usage error before the
    output directory existed leaves just verdict, reason and exit_code.
    """

    command: list[str] | None = None
    reproducer: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    host: dict[str, str] | None = None
    # Open-ended by design: each kernel provider records its own facts (source, image, build).
    kernel: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    selection: dict[str, str | None] | None = None
    # "vm" or "ssh" (results.TARGETS); `parse` re-judges skips with it.  None: the host itself.
    target_kind: str | None = None
    series: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    accel: AccelRecord | None = None
    boot: BootRecord | None = None
    # What an SSH target reported about itself (release, python, ...).
    target: dict[str, Any] | None = None
    kept_guest: dict[str, Any] | None = None
    pytest_exit: int | None = None
    tests: list[TestResult] | None = None
    counts: dict[str, Any] | None = None
    skip_reasons: list[dict[str, Any]] | None = None
    splats: list[SplatRecord] | None = None
    verdict: VerdictLabel | None = None
    reason: str | None = None
    tally: str | None = None
    exit_code: int | None = None
    # The file (in the output directory) holding the traceback of a runner bug.
    traceback: str | None = None
    kmemleak: dict[str, Any] | None = None
    # `run-selftests bench` only.
    bench_args: list[str] | None = None
    accel_label: str | None = None
    kernel_release: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object summary.json holds, schema_version included."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}
        return dict(data, schema_version=SCHEMA_VERSION)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """The record of a current-schema object; ValueError/TypeError/KeyError when malformed."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"schema_version"})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        values = {k: v for k, v in data.items() if k in fields}
        if values.get("accel") is not None:
            values["accel"] = AccelRecord(**values["accel"])
        if values.get("boot") is not None:
            boot = dict(values["boot"])
            values["boot"] = BootRecord(**dict(boot, status=BootStatus(boot["status"])))
        if values.get("tests") is not None:
            values["tests"] = [TestResult(t["name"], t["outcome"], t.get("message", ""),
                                          float(t.get("seconds", 0.0))) for t in values["tests"]]
        if values.get("splats") is not None:
            values["splats"] = [SplatRecord(**s) for s in values["splats"]]
        if values.get("verdict") is not None:
            values["verdict"] = VerdictLabel(values["verdict"])
        return cls(**values)


def _plain(value: Any) -> Any:
    """JSON-ready: dataclasses as objects, enums as their strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def write(out: Path, record: RunRecord) -> Path:
    """<out>/summary.json from record, atomically."""
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    return atomic_file.write_text(Path(out) / SUMMARY, text)


def parse(data: object, where: str = SUMMARY) -> RunRecord:
    """A RunRecord from a decoded summary.json of this or an older schema; RecordError else."""
    if not isinstance(data, dict):
        raise RecordError(f"{where} is not a run record (not a JSON object)")
    version = data.get("schema_version", data.get("schema"))
    while version in _MIGRATIONS:
        data = _MIGRATIONS[version](data)
        version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where} has schema {version!r}, this run-selftests reads "
                          f"{SCHEMA_VERSION}; re-run it or use the version that wrote it")
    try:
        return RunRecord.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise RecordError(f"{where} is not a valid schema {SCHEMA_VERSION} run record "
                          f"({type(exc).__name__}: {exc}); re-run it") from None


def read(out: Path) -> RunRecord:
    """<out>/summary.json's record; FileNotFoundError when absent, RecordError when unusable."""
    return read_file(Path(out) / SUMMARY)


def read_file(path: Path) -> RunRecord:
    """read() on a summary.json named by its own path."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{path} is not JSON ({exc}); re-run it") from None
    return parse(data, str(path))


def read_if_present(out: Path) -> RunRecord | None:
    """read(), with None for a directory that has no summary.json."""
    try:
        return read(out)
    except FileNotFoundError:
        return None

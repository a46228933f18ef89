"""`run-selftests matrix`: the suite on several kernels, one table of test x kernel.

Every kernel goes through the normal pipeline (runner.commands.pipeline.run) into its own
subdirectory of the output directory; the table is then built only from those
directories' summary.json (or junit.xml), so `--from-dir DIR` rebuilds it offline.
Cells: pass, FAIL/ERROR with the message, skip with its reason, "-" when the kernel's
run did not collect the test; a kernel whose run produced no results says why in the
kernel table.  Written as matrix.md and matrix.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runner import preflight, record
from runner.commands import option_groups, pipeline
from runner.errors import ExitCode, UsageError
from runner.markdown import cell
from runner.stages import artifacts, results

DEFAULT_KERNELS = "distro:5.10,distro:6.1,distro:6.12,distro:7.2"
KINDS = ("distro", "build", "image")
MATRIX_JSON = "matrix.json"
MATRIX_MD = "matrix.md"
SUMMARY_MD = "matrix-summary.md"
MATRIX_SCHEMA = 1
NOTE_CHARS = 300
CELL = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "skipped": "skip",
        "xfailed": "known bug"}


@dataclass(frozen=True)
class KernelSpec:
    """One column: distro:VERSION, build:DIR (a kernel tree) or image:PATH (a bzImage)."""

    kind: str
    value: str

    @property
    def label(self) -> str:
        """Column heading: the distro version, or the tree/image file name."""
        if self.kind == "distro":
            return f"distro {self.value}"
        return f"{self.kind} {Path(self.value).name or self.value}"

    @property
    def slug(self) -> str:
        """Subdirectory name for this kernel's run."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-")

    def text(self) -> str:
        """The spec as written on the command line."""
        return f"{self.kind}:{self.value}"


def parse_kernels(text: str) -> list[KernelSpec]:
    """"distro:5.10,build:DIR,image:PATH" -> specs; a malformed entry is a usage error."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, value = item.partition(":")
        if not sep or kind not in KINDS or not value:
            raise UsageError(f"--kernels entry {item!r}: write distro:VERSION, build:DIR "
                             "or image:PATH")
        specs.append(KernelSpec(kind, value))
    if not specs:
        raise UsageError("--kernels names no kernel")
    slugs = [s.slug for s in specs]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise UsageError(f"--kernels names the same kernel twice ({', '.join(duplicates)})")
    return specs


def options_for(base: pipeline.RunOptions, spec: KernelSpec, out: Path) -> pipeline.RunOptions:
    """The options of a normal run on this kernel; build options only reach build: kernels."""
    options = dataclasses.replace(base, kernel_src=None, kernel_image=None, distro_kernel=None,
                                  modules=None)
    if spec.kind == "distro":
        options.distro_kernel = spec.value
    elif spec.kind == "image":
        options.kernel_image = Path(spec.value)
    else:
        options.kernel_src = Path(spec.value)
    if spec.kind != "build":
        options.series, options.base, options.config = None, None, []
    flag = {"distro": "--distro-kernel", "image": "--kernel-image", "build": "--kernel-src"}
    # The reproducer in the kernel's summary.json: a plain run on just this kernel.
    argv = [flag[spec.kind], spec.value]
    if base.markers != pipeline.DEFAULT_MARKERS:
        argv += ["-m", base.markers or ""]
    if base.keyword:
        argv += ["-k", base.keyword]
    return dataclasses.replace(options, output=out, argv=argv)


# --- one column from a run's files --------------------------------------------------------

@dataclass
class KernelColumn:
    """What one kernel's run left behind, reduced to what the table needs."""

    spec: KernelSpec
    output_dir: str
    release: str | None = None
    origin: str | None = None
    verdict: str = "not run"
    reason: str = ""
    exit_code: int | None = None
    accel: str | None = None
    guest_seconds: float | None = None
    counts: dict = field(default_factory=dict)
    tests: list[results.TestResult] | None = None


def column_from_dir(spec: KernelSpec, out: Path) -> KernelColumn:
    """Read summary.json (tests, verdict, release); junit.xml when the summary has no tests."""
    column = KernelColumn(spec, str(out))
    summary = None
    try:
        summary = record.read(out)
    except FileNotFoundError:
        column.reason = "no summary.json: the run never started"
    except record.RecordError as exc:
        column.reason = exc.message
    if summary is not None:
        kernel = summary.kernel or {}
        column.release = kernel.get("release")
        column.origin = kernel.get("origin")
        column.verdict = summary.verdict or column.verdict
        column.reason = summary.reason if summary.reason is not None else column.reason
        column.exit_code = summary.exit_code
        column.accel = summary.accel.used if summary.accel else None
        column.guest_seconds = (summary.timings or {}).get("guest")
    if summary is not None and summary.tests:
        column.tests = list(summary.tests)
    else:
        try:
            column.tests = results.parse_junit(out / artifacts.JUNIT_FILE)
        except (FileNotFoundError, ValueError):
            column.tests = None
    if column.tests is not None:
        column.counts = results.counts(column.tests)
    return column


# --- the table ----------------------------------------------------------------------------

def build_matrix(columns: Sequence[KernelColumn]) -> dict:
    """JSON-ready matrix: kernels (one record each) and tests (outcome per kernel label)."""
    order: list[str] = []
    cells: dict[str, dict[str, dict]] = {}
    for column in columns:
        for test in column.tests or []:
            if test.name not in cells:
                order.append(test.name)
                cells[test.name] = {}
            cells[test.name][column.spec.label] = {"outcome": test.outcome,
                                                   "message": test.message}
    kernels = []
    for column in columns:
        record = {k: v for k, v in dataclasses.asdict(column).items() if k not in ("tests", "spec")}
        record.update(label=column.spec.label, spec=column.spec.text(),
                      has_results=column.tests is not None)
        kernels.append(record)
    return {"schema": MATRIX_SCHEMA, "kernels": kernels,
            "tests": [{"name": name, "results": cells[name]} for name in order]}


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 3] + "..."


def _all_passed(test: dict, kernels: list[dict]) -> bool:
    # A kernel without results is explained once in the kernel table, not on every row.
    return all(test["results"].get(k["label"], {}).get("outcome") == "passed"
               for k in kernels if k["has_results"])


def markdown(matrix: dict, only_non_passing: bool = False) -> str:
    """The kernel table, the test x kernel table, and numbered notes for every non-pass.

    only_non_passing keeps the rows where some kernel did not pass (the README's view).
    """
    kernels = matrix["kernels"]
    lines = ["| kernel | release | origin | verdict | passed | failed | skipped | accel | guest s |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for k in kernels:
        counts = k.get("counts") or {}
        failed = counts.get("failed", 0) + counts.get("error", 0) if counts else ""
        verdict = k["verdict"] + (f": {cell(_short(k['reason']))}"
                                  if k["verdict"] != "pass" and k.get("reason") else "")
        seconds = f"{k['guest_seconds']:.0f}" if k.get("guest_seconds") is not None else ""
        lines.append(f"| {k['label']} | {k.get('release') or '?'} | {k.get('origin') or ''} | "
                     f"{verdict} | "
                     f"{counts.get('passed', '')} | {failed} | {counts.get('skipped', '')} | "
                     f"{k.get('accel') or ''} | {seconds} |")
    lines.append("")
    labels = [k["label"] for k in kernels]
    lines.append("| test | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    notes: dict[str, int] = {}
    tests = matrix["tests"]
    shown = [t for t in tests if not (only_non_passing and _all_passed(t, kernels))]
    for test in shown:
        row = []
        for kernel in kernels:
            result = test["results"].get(kernel["label"])
            if result is None:
                row.append("-" if kernel["has_results"] else "n/a")
                continue
            text = CELL.get(result["outcome"], result["outcome"])
            if result["outcome"] != "passed":
                note = _short(result["message"]) or "(no message)"
                number = notes.setdefault(note, len(notes) + 1)
                text += f" [{number}]"
            row.append(text)
        lines.append(f"| {cell(test['name'])} | " + " | ".join(row) + " |")
    if len(shown) < len(tests):
        lines.append(f"| *{len(tests) - len(shown)} more tests: pass on every kernel* |"
                     + " |" * len(labels))
    if notes:
        lines.append("")
        lines.extend(f"[{number}] {cell(note)}  " for note, number in notes.items())
    if any(not k["has_results"] for k in kernels):
        lines.append("")
        lines.append("n/a: that kernel's run produced no test results (see its verdict).")
    return "\n".join(lines) + "\n"


def write_matrix(out: Path, matrix: dict) -> tuple[Path, Path]:
    """matrix.json, matrix.md (every test) and matrix-summary.md (non-passing rows only)."""
    json_path, md_path = out / MATRIX_JSON, out / MATRIX_MD
    json_path.write_text(json.dumps(matrix, indent=2) + "\n")
    md_path.write_text(markdown(matrix))
    (out / SUMMARY_MD).write_text(markdown(matrix, only_non_passing=True))
    return json_path, md_path


# --- running ------------------------------------------------------------------------------

def run_kernel(options: pipeline.RunOptions, spec: KernelSpec, out: Path,
               verbose_log: Callable[[str], None] | None) -> KernelColumn:
    """One normal pipeline run into `out`, its console/runner output kept in runner.log."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / pipeline.RUN_LOG, "w", encoding="utf-8") as log_file:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()
            if verbose_log is not None:
                verbose_log(line)

        # One kernel's problem is not the matrix's: its summary.json records it.
        pipeline.run_recorded(options_for(options, spec, out), log)
    return column_from_dir(spec, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--kernels (or --from-dir) plus the guest/test/file options of a normal run."""
    parser.add_argument("--kernels", default=DEFAULT_KERNELS, metavar="SPEC[,SPEC...]",
                        help="kernels to run the suite on: distro:VERSION, build:DIR, "
                             "image:PATH (default: %(default)s)")
    parser.add_argument("--from-dir", type=Path, metavar="DIR",
                        help="rebuild matrix.md/json from an earlier matrix output directory")
    # --kernels names the kernels (no --kernel-src, --kernel-image, --distro-kernel);
    # --base and the build options apply to its build:DIR kernels.  No --shell.
    option_groups.add_tree_options(parser, kernel_src=False)
    option_groups.add_build_options(parser)
    option_groups.add_guest_options(parser)
    option_groups.add_test_options(parser)
    option_groups.add_file_options(parser)


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Run every kernel (or re-read them), write the tables; 0 only when every kernel passed,
    else the code results.overall_exit_code picks from the kernels' own verdicts."""
    if args.from_dir is not None:
        saved = json.loads((args.from_dir / MATRIX_JSON).read_text())
        specs = [KernelSpec(*k["spec"].split(":", 1)) for k in saved["kernels"]]
        return _finish(args.from_dir,
                       [column_from_dir(spec, args.from_dir / spec.slug) for spec in specs], log)
    specs = parse_kernels(args.kernels)
    options = option_groups.options_from_args(args, [])
    # Every kernel's run would refuse a hidden path; refuse it once, before any directory exists.
    preflight.check_guest_visible(pipeline.guest_paths(options))
    out = artifacts.prepare_output_dir(options.output)
    log(f"matrix: {len(specs)} kernel(s) into {out}")
    columns: list[KernelColumn] = []
    try:
        for number, spec in enumerate(specs, 1):
            log(f"matrix: [{number}/{len(specs)}] {spec.label}: running the suite "
                f"(log: {out / spec.slug / pipeline.RUN_LOG})")
            started = time.monotonic()
            column = run_kernel(options, spec, out / spec.slug, log if args.verbose else None)
            columns.append(column)
            counts = column.counts
            log(f"matrix: [{number}/{len(specs)}] {spec.label} ({column.release or '?'}): "
                f"{column.verdict.upper()} - "
                + (f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
                   f"{counts['skipped']} skipped" if counts else column.reason)
                + f" ({time.monotonic() - started:.0f} s)")
    finally:
        # Also after Ctrl-C: the kernels that finished are worth a table.
        columns += [column_from_dir(s, out / s.slug) for s in specs[len(columns):]
                    if (out / s.slug / artifacts.SUMMARY).exists()]
        if columns:
            write_matrix(out, build_matrix(columns))
    return _finish(out, columns, log)


def _finish(out: Path, columns: Sequence[KernelColumn], log: Callable[[str], None]) -> int:
    matrix = build_matrix(columns)
    json_path, md_path = write_matrix(out, matrix)
    log("")
    log(markdown(matrix, only_non_passing=True))
    log(f"matrix: {md_path} (every test), {out / SUMMARY_MD} and {json_path}")
    if not columns:
        log("matrix: no kernel produced a run")
        return int(ExitCode.INFRASTRUCTURE)
    # Each kernel's code is its own run's verdict; the matrix reports the least trustworthy.
    return int(results.overall_exit_code(c.exit_code for c in columns))

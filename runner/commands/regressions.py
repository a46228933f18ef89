"""`run-selftests regressions`: re-introduce each known sk-storage bug and check the suite goes red.

For each entry of kernel_patches/regressions/manifest.json: the default
source with the default series plus that one regression patch, built,
booted, the suite run (the manifest's runner_args, e.g. --cpus 1, on top of
the command line's options), and the result compared with the entry's
expected failing tests (runner.commands.regression_verdict).  Each regression's run
is a normal pipeline run into <output>/<id>/; the table goes to the terminal
and to regressions.md and regressions.json.

One build directory serves the whole corpus, so each step recompiles only
the files the previous and the next patch touch: the series handed to the
pipeline lives in the cache (<cache>/regressions/series) and always lists
the default series' patches plus one slot, regression.patch, a symlink
re-pointed at each regression's patch.  The build directory key (source,
series file and entry names, fragments) is therefore the same for every
regression, and the pipeline's mtime bookkeeping rebuilds exactly the files
whose content changed.  A lock keeps two sweeps from re-pointing the slot
under each other.

Exit code: 0 when every selected regression was caught, 1 when one was not,
or, when a run could not judge its kernel (runner bug 8, infrastructure 7,
patch failure 6, build failure 5, ...), that code (results.overall_exit_code).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner import atomic_file, file_lock, preflight, record
from runner.cache import Cache, open_cache
from runner.commands import option_groups, pipeline, regression_verdict
from runner.commands.pipeline import RUN_LOG
from runner.errors import ExitCode, Interrupted, UsageError
from runner.stages import artifacts, results
from runner.stages.patches import load_series
from runner.stages.results import BootStatus, VerdictLabel

MANIFEST = pipeline.REPO_ROOT / "kernel_patches" / "regressions" / "manifest.json"
SLOT = "regression.patch"
REGRESSIONS_MD = "regressions.md"
REGRESSIONS_JSON = "regressions.json"
SCHEMA = 1
# Pipeline log lines worth showing live; everything goes to <id>/runner.log.
_PROGRESS = ("patches:", "config:", "build:", "boot:", "VERDICT", "kmemleak:")


@dataclass(frozen=True)
class Regression:
    """One manifest entry."""

    id: str
    patch: Path
    bug: str
    upstream_fix: str
    expected_failing: tuple[str, ...]
    runner_args: tuple[str, ...] = ()
    notes: str = ""


def json_entries(path: Path, what: str, option: str) -> Iterator[tuple[str, dict]]:
    """The objects of a JSON list file (the manifest, mutants' catalogue), each with where it stands.

    A missing or malformed file, or an entry that is not an object, is a usage
    error naming the file (and the entry), and `option` that chose it.
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist; check {option}") from None
    except ValueError as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise UsageError(f"{what} {path} must be a JSON list of entries")
    for number, entry in enumerate(entries, 1):
        where = f"{path} entry {number}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where} is not an object")
        yield where, entry


def load_manifest(path: Path = MANIFEST) -> list[Regression]:
    """Parse and check the manifest; a broken one is a usage error naming the entry."""
    path = Path(path)
    regressions, seen = [], set()
    for where, entry in json_entries(path, "regression manifest", "--manifest"):
        missing = [k for k in ("id", "patch", "bug", "expected_failing") if not entry.get(k)]
        if missing:
            raise UsageError(f"{where} lacks {', '.join(missing)}")
        if entry["id"] in seen:
            raise UsageError(f"{where}: id {entry['id']!r} is used twice")
        seen.add(entry["id"])
        patch = (path.parent / entry["patch"]).resolve()
        if not patch.is_file():
            raise UsageError(f"{where} ({entry['id']}): patch {patch} does not exist")
        fix = entry.get("upstream_fix") or {}
        fix_text = " ".join(p for p in (fix.get("commit", ""),
                                        f"(\"{fix['subject']}\")" if fix.get("subject") else "")
                            if p) if isinstance(fix, dict) else str(fix)
        expected = entry["expected_failing"]
        args = entry.get("runner_args", [])
        if not (isinstance(expected, list) and all(isinstance(e, str) for e in expected)):
            raise UsageError(f"{where} ({entry['id']}): expected_failing must be a list of "
                             "node-id strings")
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise UsageError(f"{where} ({entry['id']}): runner_args must be a list of strings")
        regressions.append(Regression(entry["id"], patch, entry["bug"], fix_text,
                                      tuple(expected), tuple(args), entry.get("notes", "")))
    return regressions


def select(regressions: Sequence[Regression], only: str | None) -> list[Regression]:
    """--only ID,...: manifest ids or the patches' number prefixes ("05"); keeps manifest order."""
    if not only:
        return list(regressions)
    wanted = [w.strip() for w in only.split(",") if w.strip()]

    def hits(regression: Regression, word: str) -> bool:
        return word == regression.id or regression.patch.name.startswith(f"{word}-")

    unknown = [w for w in wanted if not any(hits(r, w) for r in regressions)]
    if unknown:
        raise UsageError(f"--only: no regression {', '.join(unknown)}; known: "
                         f"{', '.join(r.id for r in regressions)}")
    return [r for r in regressions if any(hits(r, w) for w in wanted)]


# --- the shared build: one series whose last entry is a slot ---------------------------------


def slot_dir(cache: Cache) -> Path:
    return cache.root / "regressions"


def prepare_slot_series(directory: Path, default_series: Path, patch: Path) -> Path:
    """Write <directory>/series = the default series' patches + SLOT, with SLOT -> patch."""
    directory.mkdir(parents=True, exist_ok=True)
    series = load_series(default_series)
    names = []
    for entry in series.entries:
        if entry.path is None:
            raise UsageError(f"{default_series}: entry {entry.name} is a commit id; the "
                             "regression corpus needs patch files")
        (directory / entry.name).parent.mkdir(parents=True, exist_ok=True)
        _point(directory / entry.name, entry.path)
        names.append(entry.name if entry.strip == 1 else f"{entry.name} -p{entry.strip}")
    _point(directory / SLOT, Path(patch).resolve())
    text = ("# Written by `run-selftests regressions`: the default series plus one slot\n"
            f"# ({SLOT}) re-pointed at each regression, so every regression shares\n"
            "# one build directory.  Do not edit.\n" + "".join(f"{n}\n" for n in names)
            + f"{SLOT}\n")
    target = directory / "series"
    if not target.exists() or target.read_text() != text:
        atomic_file.write_text(target, text)
    return target


def _point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target`, replacing whatever was there atomically."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(link.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def sweep_lock(directory: Path, log: Callable[[str], None]) -> Iterator[None]:
    """One sweep at a time re-points the slot."""
    with file_lock.exclusive(directory / ".lock",
                             f"regressions: waiting for another sweep that uses {directory}", log):
        yield


# --- one regression --------------------------------------------------------------------------


def options_for(args: argparse.Namespace, regression: Regression, series: Path,
                out: Path) -> pipeline.RunOptions:
    """The command line's run options, the entry's runner_args on top, the slot series."""
    # runner_args take the options the command line could have given, and no others.
    parser = option_groups.Parser(prog=f"manifest runner_args of {regression.id}",
                                  add_help=False)
    add_run_options(parser)
    merged = copy.deepcopy(args)
    try:
        parser.parse_args(list(regression.runner_args), namespace=merged)
    except UsageError:
        raise UsageError(f"manifest entry {regression.id}: runner_args "
                         f"{' '.join(regression.runner_args)!r} are not run-selftests "
                         "regressions options") from None
    options = option_groups.options_from_args(merged, [])
    # The reproducer in summary.json: this very regression again.
    argv = ["regressions", "--only", regression.id]
    if args.debug_kernel:
        argv.append("--debug-kernel")
    return dataclasses.replace(options, series=series, output=out, argv=argv)


def run_one(options: pipeline.RunOptions, out: Path, log: Callable[[str], None],
            verbose: bool) -> tuple[float, str | None]:
    """A normal pipeline run into `out`; (seconds, the error of a run that stopped early)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(out / RUN_LOG, "w", encoding="utf-8") as log_file:
        def run_log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()
            if verbose or line.startswith(_PROGRESS):
                log(f"  {line}")

        _, error = pipeline.run_recorded(options, run_log)
    # Each run of a sweep boots its own copy of the image; judging it needs only the
    # logs, and 10 MB per mutant adds up over a sweep.
    (out / artifacts.BOOTED_IMAGE).unlink(missing_ok=True)
    return time.monotonic() - started, error


def outcome_from_dir(regression: Regression, out: Path, seconds: float | None = None,
                     error: str | None = None) -> regression_verdict.Outcome:
    """The table row of one regression from its output directory (also for --from-dir)."""
    try:
        summary = record.read_if_present(out)
    except record.RecordError as exc:
        summary, error = None, error or exc.message
    if summary is None:
        error = error or "no summary.json: the run did not start"
        summary = record.RunRecord()
    boot_status = summary.boot.status if summary.boot else None
    text = pipeline.read_console(out)
    # The pipeline's own reading of the files: JUnit (None when absent or broken), splats.
    _, tests, splats, _ = pipeline.judge_output_dir(out, boot_status or BootStatus.EXITED)
    if error is None and summary.verdict == VerdictLabel.ERROR:
        error = summary.reason
    found = regression_verdict.evaluate(regression.expected_failing, tests, boot_status,
                                        splats, text, error)
    verdict, reason = summary.verdict or "", summary.reason or ""
    if summary.exit_code in regression_verdict.NO_KERNEL_VERDICT:
        # The run could not judge the kernel (infrastructure, a runner bug, a build that
        # failed): neither caught nor missed, whatever the guest printed.
        found = dict(found, caught=regression_verdict.ERROR,
                     note=error or f"{verdict or 'error'}: {reason}")
    found = regression_verdict.with_run_verdict(found, summary.exit_code, verdict, reason,
                                                bool(splats))
    timings = summary.timings or {}
    return regression_verdict.Outcome(
        id=regression.id, bug=regression.bug, upstream_fix=regression.upstream_fix,
        expected=list(regression.expected_failing), verdict=verdict,
        reason=reason, exit_code=summary.exit_code,
        seconds=seconds if seconds is not None else timings.get("total"),
        build_seconds=timings.get("build"), guest_seconds=timings.get("guest"),
        runner_args=list(regression.runner_args), output_dir=str(out), **found,
    )


# --- the command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--only, --manifest, --from-dir, plus the run options a regression can take."""
    parser.add_argument("--only", metavar="ID[,ID...]",
                        help="run only these regressions (manifest ids or patch numbers "
                             "such as 05)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, metavar="FILE",
                        help="regression manifest (default: kernel_patches/regressions/"
                             "manifest.json)")
    parser.add_argument("--from-dir", type=Path, metavar="DIR",
                        help="rebuild the table from an earlier regressions output directory")
    add_run_options(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The run options a regression can take: it always builds the default source +
    kernel_patches/series + its patch, so no kernel choice, no --series and no --shell."""
    option_groups.add_build_options(parser, series=False)
    option_groups.add_guest_options(parser)
    option_groups.add_test_options(parser)
    option_groups.add_file_options(parser)


def write_tables(out: Path, outcomes: Sequence[regression_verdict.Outcome],
                 title: str) -> tuple[Path, Path]:
    """regressions.md and regressions.json in the output directory."""
    md_path, json_path = out / REGRESSIONS_MD, out / REGRESSIONS_JSON
    md_path.write_text(regression_verdict.markdown(outcomes, title))
    caught = sum(o.caught in regression_verdict.CAUGHT_LABELS for o in outcomes)
    json_path.write_text(json.dumps({"schema": SCHEMA, "title": title, "caught": caught,
                                     "total": len(outcomes),
                                     "regressions": [o.as_dict() for o in outcomes]},
                                    indent=2) + "\n")
    return md_path, json_path


def exit_code(outcomes: Sequence[regression_verdict.Outcome]) -> int:
    """0 all caught; a run that could not judge its kernel gives its code (by
    results.overall_exit_code, e.g. 8, 7, 5); else 1 when any was missed."""
    broken = [o.exit_code for o in outcomes if o.caught == regression_verdict.ERROR]
    if broken:
        return int(results.overall_exit_code(broken))
    if any(o.caught not in regression_verdict.CAUGHT_LABELS for o in outcomes):
        return int(ExitCode.TEST_FAILURE)
    return int(ExitCode.PASS)


def _title(args: argparse.Namespace) -> str:
    return "Regression corpus" + (" (debug kernel)" if args.debug_kernel else "")


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Run (or re-read) every selected regression, print and write the table."""
    regressions = select(load_manifest(args.manifest), args.only)
    if args.from_dir is not None:
        return _finish(args.from_dir, [outcome_from_dir(r, args.from_dir / r.id)
                                       for r in regressions if (args.from_dir / r.id).is_dir()],
                       _title(args), log)
    if not pipeline.DEFAULT_SERIES.exists():
        raise UsageError(f"the default series {pipeline.DEFAULT_SERIES} is missing")
    # Every regression's run would refuse a hidden path; refuse it once, before any directory.
    preflight.check_guest_visible(pipeline.guest_paths(option_groups.options_from_args(args, [])))
    out = artifacts.prepare_output_dir(args.output)
    cache = open_cache(args.cache_dir)
    log(f"regressions: {len(regressions)} regression(s) into {out}")
    outcomes: list[regression_verdict.Outcome] = []
    try:
        with sweep_lock(slot_dir(cache), log):
            for number, regression in enumerate(regressions, 1):
                series = prepare_slot_series(slot_dir(cache), pipeline.DEFAULT_SERIES,
                                             regression.patch)
                target = out / regression.id
                extra = f" with {' '.join(regression.runner_args)}" if regression.runner_args \
                    else ""
                log(f"regressions: [{number}/{len(regressions)}] {regression.id} "
                    f"({regression.patch.name}){extra}; log: {target / RUN_LOG}")
                options = options_for(args, regression, series, target)
                seconds, error = run_one(options, target, log, args.verbose)
                outcome = outcome_from_dir(regression, target, seconds, error)
                outcomes.append(outcome)
                log(f"regressions: [{number}/{len(regressions)}] {regression.id}: caught "
                    f"{outcome.caught.upper()}"
                    + (f", {outcome.crash}" if outcome.crash else "")
                    + f" ({regression_verdict.format_seconds(seconds)})")
    except (KeyboardInterrupt, Interrupted):
        if outcomes:
            write_tables(out, outcomes, _title(args) + " (interrupted)")
        raise
    return _finish(out, outcomes, _title(args), log)


def _finish(out: Path, outcomes: Sequence[regression_verdict.Outcome], title: str,
            log: Callable[[str], None]) -> int:
    md_path, json_path = write_tables(out, outcomes, title)
    log("")
    log(regression_verdict.markdown(outcomes, title))
    log(f"regressions: {md_path} and {json_path}")
    return exit_code(outcomes)


if __name__ == "__main__":
    # python -m runner.commands.regressions [options] == run-selftests regressions [options]
    import sys

    from runner.commands import cli as _cli

    sys.exit(_cli.main(["regressions", *sys.argv[1:]]))

"""`run-selftests mutants`: break the sk-storage code one edit at a time and see the suite go red.

The catalogue (kernel_patches/mutants/catalogue.json) is data: each entry names
a file of the default source, an exact piece of its text as it reads after
kernel_patches/series (`find`, the `occurrence`-th match, default the only
one), its `replace`ment and one line saying what it `breaks`.  Entries with
an `equivalent` reason are argued not to change anything observable: they are
tabled, never built.

Each mutant becomes a patch on top of the series, made from the tree's
pristine text (read under the tree lock, the series applied in a scratch
copy), and runs through the regressions machinery: a slot series (in
<cache>/mutants, so every mutant shares one incremental build directory of
its own), a normal pipeline run into <output>/<id>/.  The unmutated kernel
runs first (<output>/baseline/, same selection): tests failing there kill
nothing.  A mutant is killed when the run fails for any reason that
is about the kernel (a failing test, a splat or crash with no test to
charge, a timeout, a kmemleak report under --debug-kernel); survived when
the run passes; build-error when it does not patch or build.  The table
(mutants.md, mutants.json) gives the score = killed / (killed + survived).

`--from-diff PATCH` asks "does the suite even see my change?": the user's
diff (against the default source) is applied on top of the series and
mutation operators are applied to the lines it adds, one mutant each; every
mutant's patch carries the user's change plus one mutation, and the
unmutated run is the user's change alone (a test the change itself fails
kills none of its mutants).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.cache import open_cache
from runner.commands import option_groups, pipeline, regressions
from runner.errors import ExitCode, Interrupted, UsageError
from runner.markdown import cell
from runner.stages import artifacts, results
from runner.stages.patches import journal_dir_for, load_series, pristine_tree

CATALOGUE = pipeline.REPO_ROOT / "kernel_patches" / "mutants" / "catalogue.json"
MUTANTS_MD = "mutants.md"
MUTANTS_JSON = "mutants.json"
PATCH_NAME = "mutant.patch"
USER_CHANGE = "user-change.patch"  # --from-diff: the baseline's patch, the change unmutated
SLOT = "mutant-slot.patch"
BASELINE = "baseline"
SCHEMA = 1

KILLED = "killed"
SURVIVED = "survived"
EQUIVALENT = "equivalent"
BUILD_ERROR = "build-error"
ERROR = "error"
STATUSES = (KILLED, SURVIVED, EQUIVALENT, BUILD_ERROR, ERROR)

# Exit codes of a run that went red because of the kernel under test.
_KILLING_EXITS = {int(ExitCode.TEST_FAILURE), int(ExitCode.SPLAT), int(ExitCode.TIMEOUT)}
_BUILD_EXITS = {int(ExitCode.BUILD_FAILURE), int(ExitCode.PATCH_FAILURE)}
SHOWN_FAILURES = 3
_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class Mutant:
    """One single-edit mutant of a file of the default source (after the series)."""

    id: str
    file: str
    find: str
    replace: str
    breaks: str
    occurrence: int = 0  # 0: `find` must match exactly once; n: its n-th match
    equivalent: str = ""


def load_catalogue(path: Path = CATALOGUE) -> list[Mutant]:
    """Parse and check the catalogue; a broken entry is a usage error naming it."""
    path = Path(path)
    mutants, seen = [], set()
    for where, entry in regressions.json_entries(path, "mutant catalogue", "--catalogue"):
        missing = [k for k in ("id", "file", "find", "breaks") if not entry.get(k)]
        if "replace" not in entry:
            missing.append("replace")
        if missing:
            raise UsageError(f"{where} lacks {', '.join(missing)}")
        unknown = set(entry) - {f.name for f in dataclasses.fields(Mutant)}
        if unknown:
            raise UsageError(f"{where} ({entry['id']}): unknown field(s) {', '.join(sorted(unknown))}")
        if not _ID.match(str(entry["id"])):
            raise UsageError(f"{where}: id {entry['id']!r} must be lower-case words joined by -")
        if entry["id"] in seen:
            raise UsageError(f"{where}: id {entry['id']!r} is used twice")
        seen.add(entry["id"])
        if entry["find"] == entry["replace"]:
            raise UsageError(f"{where} ({entry['id']}): replace equals find: not a mutant")
        if "\n" in entry["breaks"]:
            raise UsageError(f"{where} ({entry['id']}): breaks must be one line")
        occurrence = entry.get("occurrence", 0)
        if "occurrence" in entry and (isinstance(occurrence, bool)
                                      or not isinstance(occurrence, int) or occurrence < 1):
            raise UsageError(f"{where} ({entry['id']}): occurrence must be a positive integer")
        mutants.append(Mutant(id=entry["id"], file=entry["file"], find=entry["find"],
                              replace=entry["replace"], breaks=entry["breaks"],
                              occurrence=occurrence, equivalent=entry.get("equivalent", "")))
    return mutants


def select(mutants: Sequence[Mutant], only: str | None) -> list[Mutant]:
    """--only ID,...: keeps catalogue order; an unknown id is a usage error."""
    if not only:
        return list(mutants)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in {m.id for m in mutants}]
    if unknown:
        raise UsageError(f"--only: no mutant {', '.join(unknown)} in the catalogue")
    return [m for m in mutants if m.id in wanted]


# --- texts and patches -----------------------------------------------------------------------


def apply_edit(text: str, mutant: Mutant) -> str:
    """text with the mutant's occurrence of `find` replaced; ValueError if it is not there."""
    count = text.count(mutant.find)
    if not mutant.occurrence and count != 1:
        raise ValueError(f"mutant {mutant.id}: its find text matches {count} times in "
                         f"{mutant.file}" + ("; name an occurrence" if count else ""))
    start = -1
    for _ in range(max(1, mutant.occurrence)):
        start = text.find(mutant.find, start + 1)
        if start < 0:
            raise ValueError(f"mutant {mutant.id}: {mutant.file} has {count} match(es) of its "
                             f"find text, not a {_ordinal(mutant.occurrence)}")
    return text[:start] + mutant.replace + text[start + len(mutant.find):]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def unified_patch(files: dict[str, tuple[str, str]]) -> str:
    """A -p1 patch turning each file's old text into its new text."""
    out = []
    for rel, (old, new) in sorted(files.items()):
        if old == new:
            continue
        out.append(f"diff --git a/{rel} b/{rel}\n")
        out.extend(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        f"a/{rel}", f"b/{rel}", n=3))
    return "".join(out)


def split_patch(text: str, strip: int = 1) -> dict[str, str]:
    """The per-file sections of a unified diff, keyed by the file's path after -p`strip`.

    A section runs from its "diff --git" line (or its "---" line) to the next one;
    anything before the first (a mail header, a commit message) is dropped.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    header: list[str] = []
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("diff --git "):
            current, header = None, [line]
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            target = lines[i + 1][4:].split("\t")[0].strip()
            if target == "/dev/null":
                target = line[4:].split("\t")[0].strip()
            rel = "/".join(target.split("/")[strip:])
            current = sections.setdefault(rel, [])
            current.extend(header + [line])
            header = []
        elif current is not None:
            current.append(line)
        elif header:
            header.append(line)  # index/mode lines between "diff --git" and "---"
    return {rel: "".join(body) for rel, body in sections.items()}


def added_lines(before: str, after: str) -> set[int]:
    """1-based line numbers, in `after`, of the lines a change inserted or rewrote.

    Read from the two texts, not from the user's diff: its line numbers are the
    pristine file's, and the series applied underneath moves them.
    """
    matcher = difflib.SequenceMatcher(None, before.splitlines(), after.splitlines(),
                                      autojunk=False)
    return {number + 1 for tag, _, _, j1, j2 in matcher.get_opcodes()
            if tag in ("insert", "replace") for number in range(j1, j2)}


def patch_text(text: str, section: str, rel: str) -> str:
    """text with one file's diff section applied (patch(1) in a scratch directory)."""
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        target = Path(scratch) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        done = subprocess.run(["patch", "-p1", "-s", "-f", "--no-backup-if-mismatch", "-d",
                               scratch], input=section, text=True, capture_output=True, check=False)
        if done.returncode != 0:
            raise ValueError(f"{rel}: the patch does not apply: "
                             f"{(done.stdout + done.stderr).strip().splitlines()[:3]}")
        return target.read_text()


def series_sections(series_file: Path, rel: str) -> list[str]:
    """Every section of the series' patches that touches rel, in series order (strip 1)."""
    sections = []
    for entry in load_series(series_file).entries:
        if entry.path is None:
            raise UsageError(f"{series_file}: entry {entry.name} is a commit id; mutants need "
                             "patch files")
        found = split_patch(Path(entry.path).read_text(), entry.strip).get(rel)
        if found:
            sections.append(found)
    return sections


def post_series_texts(source_root: Path, series_file: Path, rels: Iterable[str]) -> dict[str, str]:
    """Each file as it reads after the series: the pristine text with the series applied."""
    texts = {}
    for rel in sorted(set(rels)):
        path = source_root / rel
        if not path.is_file():
            raise UsageError(f"{rel} is not a file of the default source {source_root}")
        text = path.read_text()
        for section in series_sections(series_file, rel):
            text = patch_text(text, section, rel)
        texts[rel] = text
    return texts


def mutant_patch(mutant: Mutant, texts: dict[str, str],
                 base_change: dict[str, str] | None = None) -> str:
    """The patch (on top of the series) that makes this mutant: an optional base change
    (the user's diff, as new texts per file) plus the mutant's edit."""
    new = dict(texts)
    new.update(base_change or {})
    new[mutant.file] = apply_edit(new[mutant.file], mutant)
    return unified_patch({rel: (texts[rel], new[rel]) for rel in new})


# --- mutants of a user's diff ----------------------------------------------------------------

# (name, pattern, replacement): each applied at one match of one added line.
OPERATORS: tuple[tuple[str, str, str], ...] = (
    ("eq-to-ne", r"==", "!="),
    ("ne-to-eq", r"!=", "=="),
    ("le-to-lt", r"<=", "<"),
    ("ge-to-gt", r">=", ">"),
    ("lt-to-le", r"(?<![<-])<(?![<=])", "<="),
    ("gt-to-ge", r"(?<![>-])>(?![>=])", ">="),
    ("and-to-or", r"&&", "||"),
    ("or-to-and", r"\|\|", "&&"),
    ("drop-not", r"!(?=[A-Za-z_(])", ""),
    ("true-to-false", r"\btrue\b", "false"),
    ("false-to-true", r"\bfalse\b", "true"),
    ("inc-to-dec", r"\+\+", "--"),
    ("add-to-sub", r"(?<=\w|\)) \+ (?=\w|\()", " - "),
    ("sub-to-add", r"(?<=\w|\)) - (?=\w|\()", " + "),
)
_STATEMENT = re.compile(r"^(\s*)([A-Za-z_][\w>.\-]*\s*(?:\(|=|\+=|-=|\+\+|--).*;)\s*$")


def operator_mutants(rel: str, text: str, lines: Iterable[int], prefix: str = "") -> list[Mutant]:
    """Mutants of the given lines of one file: operator swaps, and dropping a plain statement."""
    src = text.splitlines(keepends=True)
    mutants = []
    for number in sorted(lines):
        if not 0 < number <= len(src):
            continue
        line = src[number - 1]
        code = line.split("//")[0]
        if code.lstrip().startswith(("*", "/*", "#")):
            continue
        # Each line is unique only with its neighbours: mutate the line plus its context.
        before = "".join(src[max(0, number - 3):number - 1])
        after = "".join(src[number:number + 2])
        for name, pattern, replacement in OPERATORS:
            match = re.search(pattern, code)
            if match:
                mutated = line[:match.start()] + replacement + line[match.end():]
                mutants.append(_context_mutant(rel, before, line, after, mutated,
                                               f"{prefix}{rel.rsplit('/', 1)[-1]}-{number}-{name}",
                                               f"line {number}: {name}"))
        statement = _STATEMENT.match(line.rstrip("\n"))
        if statement and not line.lstrip().startswith("return"):
            mutants.append(_context_mutant(rel, before, line, after, statement.group(1) + ";\n",
                                           f"{prefix}{rel.rsplit('/', 1)[-1]}-{number}-drop",
                                           f"line {number}: statement dropped"))
    return mutants


def _context_mutant(rel, before, line, after, mutated, mutant_id, what) -> Mutant:
    slug = re.sub(r"[^a-z0-9-]+", "-", mutant_id.lower()).strip("-")
    return Mutant(id=slug, file=rel, find=before + line + after, replace=before + mutated + after,
                  breaks=f"{what} of the user's change")


def diff_mutants(texts_before: dict[str, str], texts_after: dict[str, str]) -> list[Mutant]:
    """Operator mutants of every line the user's change adds (texts_before: the files after
    the series, texts_after: with the change on top)."""
    mutants: list[Mutant] = []
    for rel, after in texts_after.items():
        lines = added_lines(texts_before[rel], after)
        mutants.extend(m for m in operator_mutants(rel, after, lines)
                       if after.count(m.find) == 1)  # ambiguous spots skipped
    seen: set[str] = set()
    return [m for m in mutants if not (m.id in seen or seen.add(m.id))]


# --- verdicts --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One row of the table."""

    id: str
    file: str
    breaks: str
    status: str
    detail: str = ""
    seconds: float | None = None
    exit_code: int | None = None
    output_dir: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def failed_tests(summary: dict | None) -> list[str]:
    """Names of the tests a run's summary.json records as failed or errored."""
    return [t.get("name", "?") for t in (summary or {}).get("tests") or []
            if t.get("outcome") in ("failed", "error")]


def classify(summary: dict | None, error: str | None = None,
             baseline_failures: Iterable[str] = ()) -> tuple[str, str]:
    """(status, detail) of one mutant's run from its summary.json (None: it never started).

    Tests that already fail on the unmutated kernel (baseline_failures) kill nothing.
    """
    if not summary:
        return ERROR, error or "no summary.json: the run did not start"
    code = summary.get("exit_code")
    reason = summary.get("reason", "") or error or ""
    known = set(baseline_failures)
    failed = [name for name in failed_tests(summary) if name not in known]
    if code == int(ExitCode.PASS):
        return SURVIVED, reason or "every test passed"
    if code == int(ExitCode.TEST_FAILURE) and not failed:
        return SURVIVED, "only the unmutated kernel's own failures: " + ", ".join(
            sorted(set(failed_tests(summary)))[:SHOWN_FAILURES])
    if code in _KILLING_EXITS:
        if failed:
            shown = ", ".join(failed[:SHOWN_FAILURES])
            more = f" (+{len(failed) - SHOWN_FAILURES} more)" if len(failed) > SHOWN_FAILURES else ""
            return KILLED, f"{len(failed)} failed: {shown}{more}"
        return KILLED, f"no failing test: {summary.get('verdict', '')} ({reason})"
    if code in _BUILD_EXITS:
        return BUILD_ERROR, reason
    return ERROR, f"exit {code}: {reason}"


def score(outcomes: Sequence[Outcome]) -> tuple[int, int]:
    """(killed, killed + survived): equivalent, build errors and errors do not count."""
    killed = sum(o.status == KILLED for o in outcomes)
    return killed, killed + sum(o.status == SURVIVED for o in outcomes)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} m {secs:02d} s" if minutes else f"{secs} s"


def markdown(outcomes: Sequence[Outcome], title: str) -> str:
    """The table: one row per mutant, then the tally and the score."""
    rows = [f"# {title}", "",
            "| mutant | file | breaks | status | detail | time |",
            "|---|---|---|---|---|---|"]
    for o in outcomes:
        cells = [f"`{o.id}`", f"`{o.file.rsplit('/', 1)[-1]}`", o.breaks, f"**{o.status}**"
                 if o.status == SURVIVED else o.status, o.detail, format_seconds(o.seconds)]
        rows.append("| " + " | ".join(cell(c) for c in cells) + " |")
    killed, counted = score(outcomes)
    tally = ", ".join(f"{sum(o.status == s for o in outcomes)} {s}" for s in STATUSES)
    rows += ["", f"{len(outcomes)} mutants: {tally}.",
             f"Score: {killed}/{counted} killed"
             + (f" ({100 * killed / counted:.0f}%)" if counted else "") + "."]
    timed = [o.seconds for o in outcomes if o.seconds is not None]
    if timed:
        rows.append(f"Time per built mutant: mean {format_seconds(sum(timed) / len(timed))}, "
                    f"total {format_seconds(sum(timed))}.")
    return "\n".join(rows) + "\n"


def write_tables(out: Path, outcomes: Sequence[Outcome], title: str,
                 known: Sequence[str] = ()) -> tuple[Path, Path]:
    """mutants.md and mutants.json in the output directory."""
    md_path, json_path = out / MUTANTS_MD, out / MUTANTS_JSON
    text = markdown(outcomes, title)
    if known:
        text += ("Failing on the unmutated kernel too (kill nothing): "
                 + ", ".join(f"`{name}`" for name in known) + ".\n")
    md_path.write_text(text)
    killed, counted = score(outcomes)
    json_path.write_text(json.dumps({"schema": SCHEMA, "title": title, "killed": killed,
                                     "scored": counted, "total": len(outcomes),
                                     "baseline_failures": list(known),
                                     "mutants": [o.as_dict() for o in outcomes]},
                                    indent=2) + "\n")
    return md_path, json_path


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """0 when nothing survived; 1 when a mutant survived; a run that could not judge its
    kernel gives its code first (by results.overall_exit_code, as regressions do)."""
    broken = [o.exit_code or None for o in outcomes if o.status == ERROR]
    if broken:
        return int(results.overall_exit_code(broken))
    if any(o.status == SURVIVED for o in outcomes):
        return int(ExitCode.TEST_FAILURE)
    return int(ExitCode.PASS)


def read_summary(out: Path) -> dict | None:
    """A run directory's summary.json, None when absent or unreadable."""
    try:
        return json.loads((out / artifacts.SUMMARY).read_text())
    except (FileNotFoundError, ValueError):
        return None


def baseline_failures(out: Path) -> tuple[list[str], str | None]:
    """(tests failing on the unmutated kernel, why the baseline is unusable or None)."""
    summary = read_summary(out)
    if summary is None:
        return [], f"the unmutated run in {out} left no summary.json"
    code = summary.get("exit_code")
    if code in (int(ExitCode.PASS), int(ExitCode.TEST_FAILURE)):
        return failed_tests(summary), None
    return [], (f"the unmutated kernel itself ends in {summary.get('verdict')} (exit {code}: "
                f"{summary.get('reason', '')}); no mutant could be judged against it")


def outcome_from_dir(mutant: Mutant, out: Path, seconds: float | None = None,
                     error: str | None = None, known_failures: Iterable[str] = ()) -> Outcome:
    """The row of one built mutant from its output directory (also for --from-dir)."""
    summary = read_summary(out)
    status, detail = classify(summary, error, known_failures)
    if seconds is None and summary:
        seconds = (summary.get("timings") or {}).get("total")
    return Outcome(id=mutant.id, file=mutant.file, breaks=mutant.breaks, status=status,
                   detail=detail, seconds=seconds,
                   exit_code=(summary or {}).get("exit_code"), output_dir=str(out))


def mutant_run_options(options: pipeline.RunOptions, mutant_id: str,
                       baseline_failures: Sequence[str]) -> pipeline.RunOptions:
    """A mutant's run: its own reproducer, and pytest stopping at the first failure.

    One failing test kills a mutant; stopping there saves the cleanup waits of every
    other failing test (a killed mutant took about 5 min on a loaded machine, 2 min
    with --exitfirst).  Not when the baseline fails tests: one of those could end the
    run before a test that would have killed the mutant.
    """
    return dataclasses.replace(options, argv=["mutants", "--only", mutant_id],
                               exitfirst=not baseline_failures)


def equivalent_outcome(mutant: Mutant) -> Outcome:
    """The row of a mutant argued equivalent: never built."""
    return Outcome(id=mutant.id, file=mutant.file, breaks=mutant.breaks, status=EQUIVALENT,
                   detail=mutant.equivalent)


# --- the command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--only, --catalogue, --from-diff, --list, --from-dir, plus a normal run's options."""
    parser.add_argument("--only", metavar="ID[,ID...]", help="run only these catalogue mutants")
    parser.add_argument("--catalogue", type=Path, default=CATALOGUE, metavar="FILE",
                        help="mutant catalogue (default: kernel_patches/mutants/catalogue.json)")
    parser.add_argument("--from-diff", type=Path, metavar="PATCH",
                        help="instead of the catalogue, mutate the lines this diff (against "
                             "the default source) adds; each mutant keeps the diff itself")
    parser.add_argument("--list", action="store_true",
                        help="print the mutants (and check every one applies), build nothing")
    parser.add_argument("--from-dir", type=Path, metavar="DIR", action="append",
                        help="rebuild the table from an earlier mutants output directory; "
                             "repeat it to merge a sweep run in parts (a mutant's row comes "
                             "from the last DIR that has it; several need --output)")
    # A mutant always builds the default source + kernel_patches/series + one edit.
    regressions.add_run_options(parser)


def _title(args: argparse.Namespace) -> str:
    what = f"Mutants of {args.from_diff.name}" if args.from_diff else "Mutation sweep"
    return what + (" (debug kernel)" if args.debug_kernel else "")


def slot_dir(cache) -> Path:
    """The mutants' own slot series: one build directory shared by every mutant, apart from
    the regression sweep's, so a long sweep of either never waits for the other to end."""
    return cache.root / "mutants"


def prepare_slot_series(directory: Path, default_series: Path, patch: Path) -> Path:
    """regressions.prepare_slot_series with the slot named SLOT.

    The build directory is keyed by the series' entry names: a slot named like the
    regressions' would share their build directory, and a regression sweep building
    there between a mutant's build and its boot would hand the mutant's guest the
    wrong kernel (the tree lock covers the build only).
    """
    series = regressions.prepare_slot_series(directory, default_series, patch)
    text = series.read_text().replace(f"{regressions.SLOT}\n", f"{SLOT}\n")
    (directory / regressions.SLOT).unlink(missing_ok=True)
    regressions._point(directory / SLOT, Path(patch).resolve())
    if series.read_text() != text:
        tmp = directory / "series.tmp"
        tmp.write_text(text.replace("`run-selftests regressions`", "`run-selftests mutants`"))
        tmp.replace(series)
    return series


def prepare(args: argparse.Namespace,
            log: Callable[[str], None]) -> tuple[list[Mutant], dict, str | None]:
    """The mutants to run, their patches {id: text} (equivalent ones get none), and for
    --from-diff the user's change alone as a patch on top of the series (else None)."""
    from runner.stages import source

    if args.from_diff is not None and not args.from_diff.is_file():
        raise UsageError(f"--from-diff: {args.from_diff} is not a file")
    cache = open_cache(args.cache_dir)
    src = source.ensure_default_source(cache, log)
    user_sections = split_patch(args.from_diff.read_text()) if args.from_diff else {}
    mutants = [] if args.from_diff else select(load_catalogue(args.catalogue), args.only)
    rels = set(user_sections) | {m.file for m in mutants}
    # Read the pristine tree: no run has its series applied, none was left applied.
    with pristine_tree(journal_dir_for(cache.root, src.path), src.path, log):
        texts = post_series_texts(src.path, pipeline.DEFAULT_SERIES, rels)
    base_change = {}
    for rel, section in user_sections.items():
        try:
            base_change[rel] = patch_text(texts[rel], section, rel)
        except ValueError as exc:
            raise UsageError(f"--from-diff: {exc} (on the default source + series)") from None
    if args.from_diff:
        mutants = select(diff_mutants(texts, base_change), args.only)
        if not mutants:
            raise UsageError(f"--from-diff: {args.from_diff} adds no line an operator applies to")
    patches = {}
    for mutant in mutants:
        if mutant.equivalent:
            continue
        try:
            patches[mutant.id] = mutant_patch(mutant, texts, base_change)
        except ValueError as exc:
            raise UsageError(f"{exc}; fix the catalogue entry") from None
    base_patch = (unified_patch({rel: (texts[rel], new) for rel, new in base_change.items()})
                  if base_change else None)
    return mutants, patches, base_patch


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Build, boot and judge every selected mutant (or re-read them), then print the table."""
    if args.from_dir:
        return tables_from_dirs(args, log)
    mutants, patches, base_patch = prepare(args, log)
    if args.list:
        for m in mutants:
            log(f"{m.id:40} {m.file}: {m.breaks}"
                + (f"  [equivalent: {m.equivalent}]" if m.equivalent else ""))
        log(f"mutants: {len(mutants)} ({len(patches)} to build), every one applies")
        return int(ExitCode.PASS)
    out = artifacts.prepare_output_dir(args.output)
    cache = open_cache(args.cache_dir)
    log(f"mutants: {len(patches)} to build, {len(mutants) - len(patches)} equivalent, into {out}")
    outcomes: list[Outcome] = []
    title = _title(args)
    try:
        with regressions.sweep_lock(slot_dir(cache), log):
            known = baseline(args, out, log, baseline_series(cache, out, base_patch))
            built = 0
            for mutant in mutants:
                if mutant.equivalent:
                    outcomes.append(equivalent_outcome(mutant))
                    continue
                built += 1
                target = out / mutant.id
                target.mkdir(parents=True, exist_ok=True)
                patch_file = target / PATCH_NAME
                patch_file.write_text(patches[mutant.id])
                series = prepare_slot_series(slot_dir(cache),
                                                         pipeline.DEFAULT_SERIES, patch_file)
                log(f"mutants: [{built}/{len(patches)}] {mutant.id}: {mutant.breaks}; "
                    f"log: {target / regressions.RUN_LOG}")
                as_regression = regressions.Regression(mutant.id, patch_file, mutant.breaks, "",
                                                       ())
                options = regressions.options_for(args, as_regression, series, target)
                options = mutant_run_options(options, mutant.id, known)
                started = time.monotonic()
                seconds, error = regressions.run_one(options, target, log, args.verbose)
                outcome = outcome_from_dir(mutant, target, seconds or time.monotonic() - started,
                                           error, known)
                outcomes.append(outcome)
                log(f"mutants: [{built}/{len(patches)}] {mutant.id}: {outcome.status.upper()} "
                    f"({format_seconds(outcome.seconds)}) {outcome.detail}")
                # The table so far, so a long sweep can be read while it runs.
                write_tables(out, outcomes, title + " (in progress)", known)
    except (KeyboardInterrupt, Interrupted):
        if outcomes:
            write_tables(out, outcomes, title + " (interrupted)", known)
        raise
    return _finish(out, outcomes, title, log, known)


def tables_from_dirs(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """--from-dir: the table of one earlier sweep, or of a sweep run in parts.

    A sweep cut short (a reset machine, batches of --only) is finished by running
    the rest into another directory; each part is judged against its own
    unmutated run, and a mutant run in several parts keeps its last row.
    """
    dirs = args.from_dir
    if len(dirs) > 1 and args.output is None:
        raise UsageError("several --from-dir: name the directory for the merged table "
                         "with --output DIR")
    selected = select(load_catalogue(args.catalogue), args.only)
    rows: dict[str, Outcome] = {}
    known: list[str] = []
    for directory in dirs:
        if not directory.is_dir():
            raise UsageError(f"--from-dir: {directory} is not a directory")
        part_known, problem = baseline_failures(directory / BASELINE)
        if problem and (directory / BASELINE).is_dir():
            raise UsageError(problem)
        known += [name for name in part_known if name not in known]
        for m in selected:
            if not m.equivalent and (directory / m.id).is_dir():
                rows[m.id] = outcome_from_dir(m, directory / m.id, known_failures=part_known)
    outcomes = [equivalent_outcome(m) if m.equivalent else rows[m.id]
                for m in selected if m.equivalent or m.id in rows]
    out = dirs[0] if args.output is None else args.output
    out.mkdir(parents=True, exist_ok=True)
    return _finish(out, outcomes, _title(args), log, known)


def baseline_series(cache, out: Path, base_patch: str | None) -> Path | None:
    """The series of the unmutated run: the default one for the catalogue; for --from-diff
    the default series plus the user's change, in the mutants' slot (so the baseline
    builds incrementally where the mutants will)."""
    if base_patch is None:
        return None
    patch_file = out / BASELINE / USER_CHANGE
    patch_file.parent.mkdir(parents=True, exist_ok=True)
    patch_file.write_text(base_patch)
    return prepare_slot_series(slot_dir(cache), pipeline.DEFAULT_SERIES, patch_file)


def baseline(args: argparse.Namespace, out: Path, log: Callable[[str], None],
             series: Path | None = None) -> list[str]:
    """Run the unmutated kernel (same selection) into <out>/baseline; its failures.

    Unmutated means the default kernel, or for --from-diff the default kernel with
    the user's change (`series`): a test that the change itself fails says nothing
    about its mutants.  A test that fails without any mutant (a known bug, an
    expectation out of date, the change under test) cannot kill one; a baseline
    that crashed or did not build makes the whole sweep meaningless and stops it.
    """
    target = out / BASELINE
    what = "the unmutated kernel" if series is None else "your change without mutation"
    log(f"mutants: {what} first; log: {target / regressions.RUN_LOG}")
    reproducer = (["-k", args.keyword] if args.keyword else []) + (
        ["-m", args.markers] if args.markers else [])
    options = option_groups.options_from_args(args, reproducer)
    options = dataclasses.replace(options, output=target)
    if series is not None:
        options = dataclasses.replace(options, series=series)
    seconds, error = regressions.run_one(options, target, log, args.verbose)
    known, problem = baseline_failures(target)
    if problem:
        raise UsageError(problem + (f" ({error})" if error else ""))
    log(f"mutants: {what}: {len(known)} failing test(s) that kill no mutant"
        + (f": {', '.join(known[:SHOWN_FAILURES])}" if known else "")
        + f" ({format_seconds(seconds)})")
    return known


def _finish(out: Path, outcomes: Sequence[Outcome], title: str,
            log: Callable[[str], None], known: Sequence[str] = ()) -> int:
    md_path, json_path = write_tables(out, outcomes, title, known)
    log("")
    log(markdown(outcomes, title))
    log(f"mutants: {md_path} and {json_path}")
    return exit_code(outcomes)


if __name__ == "__main__":
    import sys

    from runner.commands import cli as _cli

    sys.exit(_cli.main(["mutants", *sys.argv[1:]]))

"""Stage 2, the patch series: parse a quilt series, apply it for the build, always restore.

The tree must end exactly as it started: every file the series touches is
snapshotted to an on-disk journal before anything is changed, and restored
(content, mode and mtime) on success, failure, exception and signal.  A
journal left behind by a killed run is replayed at the start of the next one.

On a git tree, patches go through `git apply` (three-way through a private
index, so the user's index is never touched) and series entries may be
commit ids picked from the tree's history; on a plain tree, `patch -pN`.

Warm rebuilds: applying and removing a series gives the patched files fresh
mtimes each run, which would recompile them every time.  The build directory
remembers each patched file's content hash and the mtime it had when it was
built; a re-applied file with the same content gets that mtime back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runner import atomic_file, file_lock
from runner.errors import PatchError, UsageError
from runner.interrupts import signals_deferred
from runner.stages.source import KernelSource, git

COMMIT_ID = re.compile(r"^[0-9a-fA-F]{7,40}$")


# --- series parsing ------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesEntry:
    """One series line: a patch file (path set) or a commit id of the tree (path None)."""

    name: str
    line: int
    strip: int = 1
    path: Path | None = None

    @property
    def is_commit(self) -> bool:
        """True when the entry names a commit of the tree rather than a file."""
        return self.path is None


@dataclass(frozen=True)
class Series:
    """A parsed series file; patch paths are relative to the series file's directory."""

    file: Path
    entries: tuple[SeriesEntry, ...]

    def listing(self) -> str:
        """The entries as a normalised series (no comments), for keys and artifacts."""
        return "".join(
            f"{e.name}{'' if e.strip == 1 else f' -p{e.strip}'}\n" for e in self.entries
        )


def parse_series_text(text: str, base_dir: Path, where: str = "series") -> Series:
    """Parse quilt series text: one patch per line, `-pN` option, `#` comments.

    A name with no file behind it is kept as a commit id when it looks like
    one; otherwise it is a missing patch and a PatchError names it.
    """
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        name, *options = line.split()
        strip = 1
        for option in options:
            match = re.fullmatch(r"-p(\d+)", option)
            if not match:
                raise PatchError(
                    f"{where}:{number}: unsupported option {option!r} for {name}; "
                    "only -pN is understood"
                )
            strip = int(match.group(1))
        candidate = base_dir / name
        if candidate.is_file():
            entries.append(SeriesEntry(name, number, strip, candidate.resolve()))
        elif COMMIT_ID.match(name):
            entries.append(SeriesEntry(name, number, strip, None))
        else:
            raise PatchError(
                f"{where}:{number}: patch {name} not found in {base_dir}; fix the series "
                "or add the file"
            )
    return Series(Path(where), tuple(entries))


def load_series(path: Path) -> Series:
    """Read and parse a series file (--series FILE)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"series file {path} does not exist; check --series")
    parsed = parse_series_text(path.read_text(encoding="utf-8"), path.resolve().parent,
                               where=str(path))
    return Series(path.resolve(), parsed.entries)


# --- which files a patch touches -----------------------------------------------------


def _strip_path(name: str, strip: int) -> str | None:
    name = name.split("\t", 1)[0].strip()
    if name.startswith('"') and name.endswith('"'):
        name = name[1:-1]
    if name == "/dev/null":
        return None
    parts = [p for p in name.split("/") if p]
    return "/".join(parts[strip:]) or None


def files_in_patch(text: str, strip: int = 1) -> list[str]:
    """Paths (relative to the tree) a unified/git diff creates, changes, renames or deletes.

    Hunk bodies are skipped by their line counts, so a removed line that
    happens to start with '-- ' is never mistaken for a file header.
    """
    files: list[str] = []
    lines = text.splitlines()
    i = 0

    def add(name: str | None) -> None:
        if name and name not in files:
            files.append(name)

    while i < len(lines):
        line = lines[i]
        hunk = re.match(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", line)
        if hunk:
            # An omitted count means one line ("@@ -5 +5 @@").
            old = int(hunk.group(1)) if hunk.group(1) is not None else 1
            new = int(hunk.group(2)) if hunk.group(2) is not None else 1
            i += 1
            while i < len(lines) and (old > 0 or new > 0):
                body = lines[i]
                if body.startswith("\\"):
                    i += 1
                    continue
                if body.startswith("-"):
                    old -= 1
                elif body.startswith("+"):
                    new -= 1
                else:
                    old -= 1
                    new -= 1
                i += 1
            continue
        if line.startswith("diff --git "):
            match = re.match(r"^diff --git (\S+) (\S+)$", line)
            if match:
                add(_strip_path(match.group(1), strip))
                add(_strip_path(match.group(2), strip))
        elif line.startswith(("rename from ", "rename to ", "copy to ")):
            add(line.split(" ", 2)[2].strip())
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            add(_strip_path(line[4:], strip))
            add(_strip_path(lines[i + 1][4:], strip))
            i += 2
            continue
        i += 1
    return files


# --- the user's uncommitted edits ----------------------------------------------------------


def dirty_paths(tree: Path) -> set[str]:
    """Files with uncommitted edits (modified, staged, deleted or untracked) in a git tree."""
    # --no-optional-locks: status must not rewrite the user's index as a side effect.
    proc = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(tree), "status", "--porcelain=v1", "-z",
         "--untracked-files=all"],
        capture_output=True, check=False,
    )
    if proc.returncode != 0:
        raise PatchError(f"git status failed in {tree}: {proc.stderr.decode().strip()[-200:]}")
    paths: set[str] = set()
    fields = proc.stdout.decode("utf-8", "surrogateescape").split("\0")
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        if len(item) < 4:
            continue
        status, path = item[:2], item[3:]
        paths.add(path)
        if "R" in status or "C" in status:
            paths.add(fields[i])
            i += 1
    return paths


# --- the restore journal ------------------------------------------------------------------


class Journal:
    """On-disk snapshots of every file a series will touch, enough to restore the tree."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index_file = directory / "journal.json"

    def exists(self) -> bool:

        """True while a journal is on disk: a run has the series applied (or was killed)."""
        return self.index_file.exists()

    def record(self, tree: Path, rel_paths: Sequence[str]) -> None:
        """Snapshot rel_paths of tree (content, mode, times; or absence) before changing them."""
        if self.directory.exists():
            shutil.rmtree(self.directory)
        blobs = self.directory / "blobs"
        blobs.mkdir(parents=True)
        files: dict[str, dict[str, object]] = {}
        created_dirs: list[str] = []
        for number, rel in enumerate(rel_paths):
            target = tree / rel
            if target.is_symlink() or target.is_file():
                info = target.lstat()
                if target.is_symlink():
                    files[rel] = {"link": os.readlink(target)}
                else:
                    shutil.copyfile(target, blobs / str(number))
                    files[rel] = {"blob": str(number), "mode": info.st_mode & 0o7777,
                                  "atime_ns": info.st_atime_ns, "mtime_ns": info.st_mtime_ns}
            else:
                files[rel] = {"absent": True}
                parent = target.parent
                while parent != tree and not parent.exists():
                    created_dirs.append(str(parent.relative_to(tree)))
                    parent = parent.parent
        record = {"tree": str(tree), "files": files,
                  "created_dirs": sorted(set(created_dirs), key=len, reverse=True)}
        atomic_file.write_text(self.index_file, json.dumps(record, indent=1))

    def restore(self) -> list[str]:
        """Put every journalled file back as it was; return the paths that had changed."""
        record = json.loads(self.index_file.read_text())
        tree = Path(record["tree"])
        changed = []
        for rel, saved in record["files"].items():
            target = tree / rel
            if saved.get("absent"):
                if target.is_symlink() or target.exists():
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
                    changed.append(rel)
                continue
            if "link" in saved:
                if not target.is_symlink() or os.readlink(target) != saved["link"]:
                    if target.is_symlink() or target.exists():
                        target.unlink()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(saved["link"], target)
                    changed.append(rel)
                continue
            blob = self.directory / "blobs" / saved["blob"]
            if target.is_symlink():
                target.unlink()
            if not target.is_file() or not _same_content(target, blob):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(blob, target)
                changed.append(rel)
            os.chmod(target, saved["mode"])
            os.utime(target, ns=(saved["atime_ns"], saved["mtime_ns"]))
        for rel in record["created_dirs"]:
            with contextlib.suppress(OSError):
                (tree / rel).rmdir()
        return changed

    def discard(self) -> None:

        """Forget the snapshots once the tree is restored."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


# --- applying ---------------------------------------------------------------------------------


@dataclass
class AppliedEntry:
    """What happened to one series entry: how it went in and which files it touched."""

    name: str
    method: str
    files: list[str]
    commit: str | None = None


@dataclass
class AppliedSeries:
    """The series as it sits on the tree during the build."""

    tree: Path
    entries: list[AppliedEntry] = field(default_factory=list)

    @property
    def touched(self) -> list[str]:
        """Every file the applied entries touched, in first-touch order."""
        seen: list[str] = []
        for entry in self.entries:
            seen.extend(f for f in entry.files if f not in seen)
        return seen


@dataclass(frozen=True)
class _Planned:
    entry: SeriesEntry
    patch: bytes
    files: list[str]
    commit: str | None


def _plan(source: KernelSource, series: Series) -> list[_Planned]:
    """Read every patch (or export every commit) and list its files before touching the tree."""
    planned = []
    for entry in series.entries:
        where = f"{series.file}:{entry.line}"
        if entry.path is not None:
            patch = entry.path.read_bytes()
            commit = None
        else:
            if not source.is_git:
                raise PatchError(
                    f"{where}: {entry.name} is not a file, and commit ids need a git tree "
                    f"({source.path} is not one); add the patch file"
                )
            proc = git(source.path, "rev-parse", "--verify", "--quiet",
                       f"{entry.name}^{{commit}}", check=False)
            if proc.returncode != 0:
                raise PatchError(
                    f"{where}: {entry.name} is neither a patch file nor a commit in "
                    f"{source.path}; fix the series or fetch the commit"
                )
            commit = proc.stdout.strip()
            parents = git(source.path, "rev-list", "--parents", "-n1", commit).stdout.split()
            if len(parents) > 2:
                raise PatchError(f"{where}: {entry.name} is a merge commit; list its commits")
            exported = subprocess.run(
                ["git", "-C", str(source.path), "format-patch", "-1", "--stdout", "--binary",
                 "--no-signature", "--no-renames", commit],
                capture_output=True, check=True,
            )
            patch = exported.stdout
        files = files_in_patch(patch.decode("utf-8", "surrogateescape"), entry.strip)
        if not files:
            raise PatchError(f"{where}: {entry.name} contains no diff; check the file")
        planned.append(_Planned(entry, patch, files, commit))
    return planned


_HUNK_NOISE = re.compile(
    r"FAILED|can't find file|Reversed|error|does not apply|patch failed|conflict|"
    r"does not exist|already exists|malformed|corrupt",
    re.IGNORECASE,
)


# patch(1) names the file on its own line before that file's failed hunks.
_FILE_LINE = re.compile(r"^(patching|checking) file ")


def _failure_lines(*outputs: str) -> list[str]:
    """The lines naming failed files and hunks, without duplicates, for the error details."""
    lines: list[str] = []
    for output in outputs:
        for line in output.splitlines():
            line = line.rstrip()
            wanted = _HUNK_NOISE.search(line) or _FILE_LINE.match(line)
            if wanted and "while searching for" not in line and line not in lines:
                lines.append(line)
    # A file line with no failure after it is noise.
    kept = [line for i, line in enumerate(lines)
            if not _FILE_LINE.match(line) or (i + 1 < len(lines)
                                              and not _FILE_LINE.match(lines[i + 1]))]
    if kept:
        return kept[:20]
    return [line for output in outputs for line in output.splitlines() if line.strip()][-10:]


def _apply_with_git(tree: Path, item: _Planned, patch_file: Path) -> str:
    strip = f"-p{item.entry.strip}"
    check = subprocess.run(
        ["git", "-C", str(tree), "apply", "--check", "--verbose", strip, str(patch_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
    )
    if check.returncode == 0:
        subprocess.run(["git", "-C", str(tree), "apply", strip, str(patch_file)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True)
        return "git apply"
    # Three-way needs an index: use a private copy of the user's, brought up
    # to date for the files the patch touches, and throw it away afterwards.
    real_index = Path(git(tree, "rev-parse", "--path-format=absolute", "--git-path",
                          "index").stdout.strip())
    with tempfile.TemporaryDirectory(prefix="sk-storage-index-") as tmp:
        private_index = Path(tmp) / "index"
        if real_index.exists():
            shutil.copyfile(real_index, private_index)
        env = dict(os.environ, GIT_INDEX_FILE=str(private_index), LC_ALL="C")
        existing = [f for f in item.files if (tree / f).exists()]
        if existing:
            subprocess.run(["git", "-C", str(tree), "update-index", "--add", "--remove",
                            "--", *existing], env=env, capture_output=True,
                           check=False)
        merge = subprocess.run(
            ["git", "-C", str(tree), "apply", "--3way", strip, str(patch_file)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
        )
    if merge.returncode == 0:
        return "git apply --3way"
    raise _NotApplied(_failure_lines(check.stdout, merge.stdout))


def _apply_with_patch(tree: Path, item: _Planned, patch_file: Path) -> str:
    base = ["patch", f"-p{item.entry.strip}", "--batch", "--forward", "-d", str(tree),
            "-i", str(patch_file)]
    dry = subprocess.run(base + ["--dry-run"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, check=False)
    if dry.returncode != 0:
        raise _NotApplied(_failure_lines(dry.stdout))
    real = subprocess.run(base + ["--no-backup-if-mismatch", "--reject-file=-"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if real.returncode != 0:
        raise _NotApplied(_failure_lines(real.stdout))
    return "patch"


class _NotApplied(Exception):
    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def journal_dir_for(cache_root: Path, tree: Path) -> Path:
    """Where the patch journal of a tree lives; its lock file sits beside it (<dir>.lock)."""
    return cache_root / "restore" / hashlib.sha256(str(tree).encode()).hexdigest()[:16]


def replay_journal(journal_dir: Path) -> list[str] | None:
    """Put back what a killed run left patched; the paths restored, or None if no journal.

    Call it holding the tree lock (see pristine_tree), never beside a live run.
    """
    journal = Journal(journal_dir)
    if not journal.exists():
        return None
    with signals_deferred():
        restored = journal.restore()
        journal.discard()
    return restored


@contextlib.contextmanager
def pristine_tree(journal_dir: Path, tree: Path,
                  log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the tree's lock, with any series a killed run left applied taken out first.

    One run at a time patches and builds a tree: runs in parallel (a bisect, a
    regression sweep, a user) share the cached default tree, and without the
    lock one would build another's patches or "repair" a live run's journal.
    Every reader of the pristine text goes through here, so a run killed with
    its series applied (SIGKILL, a reset machine) never leaves the next run
    reading patched text.
    """
    lock_file = journal_dir.with_name(journal_dir.name + ".lock")
    with file_lock.exclusive(lock_file, f"patches: waiting for another run that is building "
                                        f"{tree}", log):
        restored = replay_journal(journal_dir)
        if restored is not None:
            log(f"patches: restored {len(restored)} file(s) that an interrupted run left "
                f"patched in {tree}")
        yield


@contextlib.contextmanager
def series_applied(
    source: KernelSource,
    series: Series | None,
    journal_dir: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Iterator[AppliedSeries]:
    """Apply the series for the duration of the block; the tree is restored whatever happens.

    The tree is locked for the whole block (see pristine_tree), also with no
    series, so a plain build never sees another run's patches.
    """
    with pristine_tree(journal_dir, source.path, log), \
            _applied(source, series, journal_dir, force, log) as applied:
        yield applied


@contextlib.contextmanager
def _applied(
    source: KernelSource, series: Series | None, journal_dir: Path, force: bool,
    log: Callable[[str], None],
) -> Iterator[AppliedSeries]:
    journal = Journal(journal_dir)
    applied = AppliedSeries(source.path)
    if series is None or not series.entries:
        yield applied
        return

    planned = _plan(source, series)
    touched: list[str] = []
    for item in planned:
        touched.extend(f for f in item.files if f not in touched)

    if source.is_git and not force:
        dirty = sorted(set(touched) & dirty_paths(source.path))
        if dirty:
            raise PatchError(
                f"the series touches file(s) with uncommitted edits in {source.path}: "
                f"{', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''}; commit or stash "
                "them, or pass --force to apply on top of them"
            )

    with signals_deferred():
        journal.record(source.path, touched)
    try:
        with tempfile.TemporaryDirectory(prefix="sk-storage-patch-") as tmp:
            for item in planned:
                patch_file = Path(tmp) / "current.patch"
                patch_file.write_bytes(item.patch)
                try:
                    if source.is_git:
                        method = _apply_with_git(source.path, item, patch_file)
                    else:
                        method = _apply_with_patch(source.path, item, patch_file)
                except _NotApplied as failure:
                    raise PatchError(
                        f"patch {item.entry.name} ({series.file}:{item.entry.line}) does not "
                        f"apply to {source.path}; the tree was restored, refresh the patch",
                        details=failure.lines,
                    ) from None
                applied.entries.append(
                    AppliedEntry(item.entry.name, method, item.files, item.commit)
                )
                log(f"patches: applied {item.entry.name} ({method})")
        yield applied
    finally:
        replay_journal(journal_dir)


# --- keeping rebuilds incremental ------------------------------------------------------------


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _load_record(state_file: Path) -> dict[str, dict]:
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}


def _save_record(state_file: Path, record: dict[str, dict]) -> None:
    atomic_file.write_text(state_file, json.dumps(record, indent=1, sort_keys=True))


def reuse_built_mtimes(tree: Path, rel_paths: Sequence[str], state_file: Path) -> list[str]:
    """Before a build: give re-applied files with unchanged content their built mtime back.

    Make must rebuild exactly what changed since the last successful build:
    a patched file whose content is unchanged gets the mtime it had then (no
    rebuild); one whose content changed keeps its fresh mtime and leaves the
    record, so even a failed build can never leave a stale object trusted;
    a file patched last time but not now is back to its old content under an
    old mtime, so it is stamped now to force its rebuild.  Returns the paths
    whose built mtime was restored.
    """
    record = _load_record(state_file)
    if not record and not rel_paths:
        return []
    restored = []
    for rel in rel_paths:
        known = record.get(rel)
        path = tree / rel
        if known and _file_digest(path) == known["sha256"]:
            os.utime(path, ns=(path.stat().st_atime_ns, known["mtime_ns"]))
            restored.append(rel)
        else:
            record.pop(rel, None)
    for rel in [r for r in record if r not in rel_paths]:
        path = tree / rel
        if path.exists():
            os.utime(path)
        del record[rel]
    _save_record(state_file, record)
    return restored


def remember_built_mtimes(tree: Path, rel_paths: Sequence[str], state_file: Path) -> None:
    """After a successful build, record each patched file's content hash and mtime."""
    record = {}
    for rel in rel_paths:
        digest = _file_digest(tree / rel)
        if digest is not None:
            record[rel] = {"sha256": digest, "mtime_ns": (tree / rel).stat().st_mtime_ns}
    _save_record(state_file, record)

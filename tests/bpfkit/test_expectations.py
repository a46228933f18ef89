"""The feature-expectation table and the known-bug registry: parsing, judging, and strictness.

The strictness tests run the real suite's conftest on a throw-away test file with a
throw-away registry, so they show the verdicts pytest itself gives: a known bug's failure
is an xfail, a pass on an "affected" kernel fails the run (stale entry), and a failure of
another kind stays a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

SUITE = REPO / "selftests"
sys.path.insert(0, str(SUITE))

from bpfkit import kernel, known_bugs, probes

# /proc/version lines of real kernels (Debian's packages and this project's machines).
DEBIAN_5_10 = ("Linux version 5.10.0-32-amd64 (debian-kernel@lists.debian.org) (gcc-10 "
               "(Debian 10.2.1-6) 10.2.1 20210110, GNU ld (GNU Binutils for Debian) 2.35.2) "
               "#1 SMP Debian 5.10.223-1 (2024-08-10)")
DEBIAN_6_12 = ("Linux version 6.12.117+deb13-amd64 (debian-kernel@lists.debian.org) "
               "(x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0, GNU ld (GNU Binutils for "
               "Debian) 2.44) #1 SMP PREEMPT_DYNAMIC Debian 6.12.117-1 (2026-01-20)")
SELF_BUILT_6_1 = ("Linux version 6.1.192 (root@host) (gcc (Debian 12.2.0-14+deb12u1) 12.2.0, "
                  "GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Tue Dec  1 2026")
HOST_6_18 = ("Linux version 6.18.44-fc-v1045 (builder@sandboxing) (gcc (GCC) 15.3.0, GNU ld "
             "(GNU Binutils) 2.46) #1 SMP PREEMPT_DYNAMIC @0")


@pytest.mark.parametrize("release, proc_version, version, debian", [
    ("5.10.0-32-amd64", DEBIAN_5_10, (5, 10, 223), "5.10.223-1"),
    ("6.12.117+deb13-amd64", DEBIAN_6_12, (6, 12, 117), "6.12.117-1"),
    # The compiler's "(Debian 12.2.0-14...)" must not be read as the kernel's version.
    ("6.1.192", SELF_BUILT_6_1, (6, 1, 192), None),
    ("6.18.44-fc-v1045", HOST_6_18, (6, 18, 44), None),
])
def test_kernel_identity_is_the_upstream_release(release, proc_version, version, debian):
    identity = kernel.identify(release, proc_version)
    assert identity.version == version
    assert identity.debian_version == debian


def test_heap_init_comes_from_the_command_line_then_the_boot_log():
    boot_on = "[    0.201468] mem auto-init: stack:all(zero), heap alloc:on, heap free:off"
    boot_off = boot_on.replace("alloc:on", "alloc:off")
    assert kernel.parse_heap_init_on_alloc("quiet", boot_on) is True
    assert kernel.parse_heap_init_on_alloc("quiet", boot_off) is False
    assert kernel.parse_heap_init_on_alloc("quiet init_on_alloc=0", boot_on) is False
    assert kernel.parse_heap_init_on_alloc("quiet", "") is None


# --- feature expectations ------------------------------------------------------------------

def test_every_feature_in_the_table_has_a_probe_and_a_release():
    assert set(probes.FEATURES) >= {"sk_storage_map", "clone_flag", "diag_storages",
                                    "sk_storage_iter", "sk_storage_tracing_helpers"}
    assert probes.FEATURES["clone_flag"].since == "5.4"
    assert probes.FEATURES["sk_storage_iter"].since == "5.9"
    for feature in probes.FEATURES.values():
        kernel.parse_version(feature.since)  # raises on a typo


def test_a_table_without_a_probe_is_refused(tmp_path):
    table = json.loads(probes.FEATURES_FILE.read_text())
    table["time_travel"] = {"what": "x", "since": "9.9", "config": []}
    path = tmp_path / "features.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match="time_travel"):
        probes.load_features(path)


ABSENT = probes.Status(False, "BPF_MAP_CREATE failed with EINVAL")
POLICY = probes.Status(False, "BPF_PROG_LOAD failed with EPERM", policy=True)


def test_a_kernel_that_must_have_the_feature_fails():
    action, message = probes.judge_missing(
        "clone_flag", ABSENT, kernel.identify("6.1.192", SELF_BUILT_6_1), {})
    assert action == "fail"
    assert message == ("kernel 6.1.192 must have BPF_F_CLONE (since 5.4) but "
                       "BPF_MAP_CREATE failed with EINVAL")


def test_an_older_kernel_skips_with_the_release():
    action, message = probes.judge_missing(
        "sk_storage_iter", ABSENT, kernel.identify("5.4.0", "Linux version 5.4.0 #1 SMP"), None)
    assert (action, message) == ("skip", ("[older kernel] kernel 5.4.0 lacks bpf_iter for sk "
                                          "storage maps (5.9+)"))


def test_an_unset_config_skips_only_when_the_config_says_so():
    identity = kernel.identify("6.1.192", SELF_BUILT_6_1)
    action, message = probes.judge_missing(
        "kernel_btf", ABSENT, identity, {"CONFIG_DEBUG_INFO_BTF": "n"})
    assert action == "skip" and message.startswith("[kernel config] ")
    assert "CONFIG_DEBUG_INFO_BTF" in message
    assert probes.judge_missing("kernel_btf", ABSENT, identity, None)[0] == "fail"
    assert probes.judge_missing(
        "kernel_btf", ABSENT, identity, {"CONFIG_DEBUG_INFO_BTF": "y"})[0] == "fail"


def test_a_policy_refusal_is_an_environment_skip():
    action, message = probes.judge_missing(
        "sk_storage_iter", POLICY, kernel.identify("6.18.44-fc", HOST_6_18), {})
    assert action == "skip" and message.startswith("[environment] ")
    assert "EPERM" in message


# --- known bugs ------------------------------------------------------------------------------

REGISTRY = known_bugs.load_registry()


def _bug(fix: str) -> known_bugs.KnownBug:
    return next(bug for bug in REGISTRY if bug.fix == fix)


@pytest.mark.parametrize("proc_version, release, affected", [
    (DEBIAN_5_10, "5.10.0-32-amd64", True),
    (DEBIAN_6_12, "6.12.117+deb13-amd64", False),
    (SELF_BUILT_6_1, "6.1.192", False),
    (HOST_6_18, "6.18.44-fc-v1045", True),
])
def test_the_clone_bailout_bug_affects_the_kernels_seen_failing(proc_version, release, affected):
    identity = kernel.identify(release, proc_version)
    assert _bug("7cbd0c4cebe4").affects(identity, frozenset(), None) is affected


def test_a_backport_or_zeroed_heap_clears_the_diag_bug():
    bug = _bug("b5c111f4967b")
    identity = kernel.identify("6.1.192", SELF_BUILT_6_1)
    assert bug.affects(identity, frozenset(), False)
    assert not bug.affects(identity, frozenset({"b5c111f4967b"}), False)
    assert not bug.affects(identity, frozenset({"b5c111f"}), False)
    assert not bug.affects(identity, frozenset(), True)


def test_every_registry_test_exists_in_the_suite():
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=SUITE, capture_output=True, text=True, check=True).stdout
    nodes = {line.split("[", 1)[0] for line in collected.splitlines() if "::" in line}
    for bug in REGISTRY:
        for test in bug.tests:
            assert test in nodes, f"{bug.fix}: {test} is not a test of the suite"


def test_the_default_series_names_the_fix_it_carries():
    patches = sorted((REPO / "kernel_patches").glob("0*.patch"))
    texts = [p.read_text() for p in patches]
    assert known_bugs.fixes_named_in(texts, REGISTRY) == {"b5c111f4967b"}


def test_backports_must_be_commit_ids():
    assert known_bugs.parse_backports(" b5c111f4967b,7cbd0c4 ") == {"b5c111f4967b", "7cbd0c4"}
    with pytest.raises(ValueError, match="zz"):
        known_bugs.parse_backports("zz")


# --- strictness, through pytest itself -----------------------------------------------------

FAKE_TESTS = '''
def test_fixed_kernel_passes():
    pass

def test_bug_shows():
    assert 1 == 2, "the known bug"

def test_something_else_breaks():
    raise RuntimeError("an unrelated failure")
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="[not root] the suite's conftest marks known "
                    "bugs only where it can run, as root")
def test_known_bugs_are_strict_expected_failures(tmp_path):
    suite = tmp_path / "suite"
    shutil.copytree(SUITE, suite, ignore=shutil.ignore_patterns("test_*.py", "__pycache__"))
    (suite / "test_fake.py").write_text(FAKE_TESTS)
    registry = tmp_path / "bugs.json"
    tests = ["test_fake.py::test_fixed_kernel_passes", "test_fake.py::test_bug_shows",
             "test_fake.py::test_something_else_breaks"]
    registry.write_text(json.dumps({"bugs": [{
        "fix": "0123456789ab", "subject": "bpf: a fake fix", "tests": tests,
        "affected": [["3.0", None]], "fails_with": "AssertionError"}]}))
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rxXf",
         f"--known-bugs={registry}", f"--junitxml={junit}", "test_fake.py"],
        cwd=suite, capture_output=True, text=True, check=False)
    out = run.stdout
    assert run.returncode == 1, out
    assert "1 failed" not in out and "2 failed, 1 xfailed" in out, out
    assert "[XPASS(strict)] known bug, fixed upstream by 0123456789ab" in out, out
    assert "update or retire 0123456789ab" in out, out
    assert "XFAIL test_fake.py::test_bug_shows" in out, out
    assert "not the way known bug 0123456789ab fails" in out, out
    # The backport option clears the expectation: the "fixed" test then simply passes.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--known-bugs={registry}",
         "--kernel-backports=0123456789ab", "test_fake.py::test_fixed_kernel_passes"],
        cwd=suite, capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout


def test_the_runner_passes_the_default_series_backports_to_the_guest():
    from runner.commands import pipeline

    series = pipeline.patches.load_series(pipeline.DEFAULT_SERIES)
    entries = [{"path": str(entry.path)} for entry in series.entries]
    assert pipeline.known_bug_backports({"entries": entries}) == ["b5c111f4967b"]
    assert pipeline.known_bug_backports(None) == []


def test_a_feature_a_test_finds_missing_skips_only_an_older_kernel(monkeypatch):
    monkeypatch.setattr(kernel, "running", lambda: kernel.identify("5.10.0-32-amd64", DEBIAN_5_10))
    with pytest.raises(pytest.skip.Exception, match=r"^\[older kernel\] kernel 5\.10\.223 .* "
                                                    r"lacks BTF_KIND_FLOAT \(5\.13\+\)"):
        probes.absent("BTF_KIND_FLOAT", "5.13", "EINVAL")
    with pytest.raises(pytest.fail.Exception, match="must have bpf_iter .* but EINVAL"):
        probes.absent("bpf_iter", "5.9", "EINVAL")


def test_every_skip_in_the_suite_states_its_category():
    """A skip without a category is one the runner cannot judge: it fails every guest run."""
    import ast

    categories = ("ENVIRONMENT", "OLDER_KERNEL", "KERNEL_CONFIG", "NOT_ROOT")
    offenders = []
    for path in sorted(SUITE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "skip" and getattr(node.func.value, "id", "") == "pytest"):
                continue
            reason = ast.unparse(node.args[0]) if node.args else ""
            # A category constant in the text, or probes.require()'s judged `message`.
            stated = reason == "message" or any(
                f"probes.{c}" in reason or f"{{{c}}}" in reason for c in categories)
            if not stated:
                offenders.append(f"{path.relative_to(SUITE)}:{node.lineno}: {reason}")
    assert offenders == []


def test_root_refused_any_bpf_command_is_the_hosts_policy(monkeypatch):
    """A container whose seccomp profile answers bpf(2) with EPERM is an environment, not a kernel."""
    from bpfkit import syscall

    def refused() -> bool:
        raise syscall.BpfError(1, "BPF_MAP_CREATE")

    import dataclasses

    monkeypatch.setitem(probes.FEATURES, "bpf_syscall",
                        dataclasses.replace(probes.FEATURES["bpf_syscall"], probe=refused))
    probes.status.cache_clear()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    try:
        assert probes.status("bpf_syscall") == probes.Status(
            False, "BPF_MAP_CREATE failed with EPERM", policy=True)
    finally:
        probes.status.cache_clear()

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

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "ci"
WORKFLOWS = ROOT / ".github" / "workflows"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
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
def real_summary() -> dict:
    return json.loads((RUN / "summary.json").read_text())


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
    real_summary["accel"]["used"] = "kvm"
    assert accel.judge(real_summary, "kvm")[0]


def test_check_accel_passes_when_no_guest_booted():
    ok, message = load_script("check-accel").judge(
        {"verdict": "error", "reason": "kernel build failed"}, "kvm")
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
    (out / "summary.json").write_text(json.dumps(
        {"verdict": "crash", "reason": "the guest died before the suite finished",
         "exit_code": 3}))
    proc = run_script("junit-summary", str(out), "--title", "6.12")
    assert proc.returncode == 0
    assert "No test results: no junit.xml." in proc.stdout
    assert "::error title=6.12%3A no test results::the guest died before the suite finished" \
        in proc.stdout
    assert run_script("junit-summary", str(tmp_path / "absent")).returncode == 2


def test_annotations_are_capped():
    junit = load_script("junit-summary")
    from runner.results import TestResult

    tests = [TestResult(f"t::test_{i}", "failed", "boom", 0.1) for i in range(25)]
    lines = junit.annotations("x", tests, None, {})
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

    values = key.compose("x86_64", "6.1.192-2", "aaa", "bbb", "release")
    assert values["key"] == "sk-storage-build-v1-x86_64-linux-6.1.192-2-series-aaa-kconfig-bbb-release"
    # Each restore key is a prefix of the key, most specific first.
    assert all(values["key"].startswith(prefix) for prefix in values["restore-keys"])
    assert values["restore-keys"] == sorted(values["restore-keys"], key=len, reverse=True)
    assert "," not in key.compose("x", "6.1,2", "a", "b", "r")["key"]


def test_cache_key_command_line_writes_github_output(tmp_path):
    output = tmp_path / "github-output"
    proc = run_script("cache-key", "--source-version", "6.1.192-2",
                      env={"GITHUB_OUTPUT": str(output)})
    assert proc.returncode == 0, proc.stderr
    text = output.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("key=sk-storage-build-v1-")
    assert lines[1] == "restore-keys<<EOF_RESTORE_KEYS" and lines[-1] == "EOF_RESTORE_KEYS"
    key = lines[0].split("=", 1)[1]
    assert key.endswith("-release") and "-linux-6.1.192-2-series-" in key
    # Same inputs, same key; no series, another key.
    again = run_script("cache-key", "--source-version", "6.1.192-2")
    assert again.stdout.splitlines()[0] == lines[0]
    other = run_script("cache-key", "--source-version", "6.1.192-2", "--no-series")
    assert "-series-none-" in other.stdout.splitlines()[0]


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
    assert "-linux-6.13.0-rc1-series-none-" in key and key.endswith(f"-{head[:12]}")
    bad = run_script("cache-key", "--kernel-src", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such directory" in bad.stderr


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
    ({"build": {"steps": 10}, "verdict": "test failure"}, 1, "true"),
    ({"verdict": "error", "reason": "kernel build failed"}, 5, "false"),
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
    proc = run_script("run-job", "5.10", "--output", str(tmp_path / "out"),
                      env={"RUN_SELFTESTS": str(fake), "GITHUB_OUTPUT": str(output)})
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert json.loads(record.read_text()) == ["--distro-kernel", "5.10", "--output",
                                              str(tmp_path / "out")]
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


def test_ci_bisect_passes_the_steps_verdict_through(tmp_path):
    # --help is a step that ends with 0: the exit status must reach git unchanged.
    proc = subprocess.run([sys.executable, str(CI / "bisect"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--runs N" in proc.stdout


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


@pytest.mark.parametrize("workflow", ["selftests.yml", "tests.yml"])
def test_actionlint_passes(actionlint, workflow):
    proc = subprocess.run([actionlint, "-no-color", str(WORKFLOWS / workflow)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    broken = (WORKFLOWS / "selftests.yml").read_text().replace(
        "steps.run.outputs.built", "steps.rnu.outputs.built")
    target = tmp_path / ".github" / "workflows" / "broken.yml"
    target.parent.mkdir(parents=True)
    target.write_text(broken)
    proc = subprocess.run([actionlint, "-no-color", str(target)], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "rnu" in proc.stdout


def test_workflows_keep_their_promises():
    """What actionlint does not check: pinned actions, timeouts, if: always() uploads."""
    for name in ("selftests.yml", "tests.yml"):
        text = (WORKFLOWS / name).read_text()
        assert "\n  cancel-in-progress: true\n" in text
        uses = re.findall(r"^\s+(?:- )?uses: (\S+)(.*)$", text, re.MULTILINE)
        assert uses
        for action, comment in uses:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), f"{action} not pinned"
            assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), f"{action}: say the version"
        jobs = re.findall(r"^  ([\w-]+):\n    (?:name|runs-on)", text, re.MULTILINE)
        timeouts = re.findall(r"^    timeout-minutes: \S", text, re.MULTILINE)
        assert jobs and len(timeouts) == len(jobs), f"{name}: a job without timeout-minutes"
        for run in re.findall(r"^\s+(?:- )?run: (.*)$", text, re.MULTILINE):
            assert run.strip() not in ("|", ">"), f"{name}: long inline shell"
    selftests = (WORKFLOWS / "selftests.yml").read_text()
    kernels = re.findall(r"kernel: \"?([\w.]+)\"?, name", selftests)
    assert kernels == ["source", "5.10", "6.1", "6.12", "7.2"]
    upload = selftests.split("- name: Upload artifacts\n", 1)[1]
    assert upload.startswith("        if: always()\n")
    for artifact in ("console.log", "junit.xml", "build.log", "summary.json"):
        assert f"            out/{artifact}\n" in upload
    runs = re.findall(r"^        run: (.*)$", selftests, re.MULTILINE)
    assert runs and all("selftests/ci/" in run for run in runs)


def test_junit_summary_shows_known_bugs_skip_reasons_and_an_unexpected_skip(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="test_ok" time="0.1"/>'
        '<testcase classname="t" name="test_bug" time="0.1"><skipped type="pytest.xfail" '
        'message="known bug: fixed upstream by 55d49f750b1c"/></testcase>'
        '<testcase classname="t" name="test_iter" time="0.1"><skipped type="pytest.skip" '
        'message="[environment] policy refused BPF_PROG_TYPE_TRACING (EPERM)"/></testcase>'
        '</testsuite></testsuites>')
    (out / "summary.json").write_text(json.dumps(
        {"verdict": "unexpected skip", "exit_code": 1,
         "reason": "1 test(s) skipped for a reason a runner-booted guest must not have"}))
    proc = run_script("junit-summary", str(out), "--title", "6.1")
    assert proc.returncode == 0, proc.stderr
    assert "| 🐞 known bug | `t::test_bug` |" in proc.stdout
    assert "**1 passed, 0 failed, 1 skipped (environment 1), 1 known bug**" in proc.stdout
    assert "* 1 × [environment] policy refused BPF_PROG_TYPE_TRACING (EPERM)" in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert errors == [("::error title=6.1%3A unexpected skip::1 test(s) skipped for a reason "
                       "a runner-booted guest must not have")]

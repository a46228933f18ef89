"""What --target pushes and what runs on the target, without SSH: the pytest closure worked out
from the real installed metadata, the bundle's contents, and the driver run for real on a
scratch directory with the system python3 and only the pushed pytest.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from bpfkit import kmsg
from conftest import REPO, TESTS

from runner.errors import UsageError
from runner.guest import remote_driver
from runner.targets import remote_bundle

GUEST_SUITE = TESTS / "fixtures" / "runner" / "guest-suite"
KMSG_RECORDS = TESTS / "fixtures" / "splats" / "kmsg-records.hex"
SYSTEM_PYTHON = "/usr/bin/python3"


def environment(python: str) -> dict:
    """The PEP 508 environment of a Linux CPython `python` (as the probe reports it)."""
    return {"implementation_name": "cpython", "implementation_version": python,
            "os_name": "posix", "platform_machine": platform.machine(),
            "platform_python_implementation": "CPython", "platform_release": "6.1.0",
            "platform_system": "Linux", "platform_version": "#1 SMP",
            "python_full_version": python, "python_version": ".".join(python.split(".")[:2]),
            "sys_platform": "linux"}


def names(dists) -> set:
    return {d.metadata["Name"].lower() for d in dists}


def test_closure_for_the_runners_own_python_is_pytest_and_its_pure_dependencies():
    dists = remote_bundle.pytest_closure(environment(platform.python_version()))
    assert names(dists) >= {"pytest", "pluggy", "iniconfig", "packaging"}
    assert dists[0].metadata["Name"] == "pytest"
    if sys.version_info >= (3, 11):
        # Needed below 3.11 only: the markers must have been evaluated for the target.
        assert not names(dists) & {"exceptiongroup", "tomli"}


def test_closure_for_an_older_target_needs_the_backports():
    try:
        dists = remote_bundle.pytest_closure(environment("3.10.12"))
    except UsageError as error:
        # The runner's environment (3.11+) lacks them, or its pluggy wants a newer Python:
        # either way the message names the problem and the way out.
        assert "3.10.12" in error.message
        assert "install pytest on the target" in error.message
    else:
        assert names(dists) >= {"exceptiongroup", "tomli"}


def test_closure_for_a_python_pytest_cannot_run_on_is_refused():
    with pytest.raises(UsageError) as caught:
        remote_bundle.pytest_closure(environment("3.6.15"))
    assert "pytest" in caught.value.message and "3.6.15" in caught.value.message


def test_bundle_holds_the_suite_and_the_pushed_packages_as_plain_files():
    dists = remote_bundle.pytest_closure(environment(platform.python_version()))
    suite = REPO / "selftests"
    with tarfile.open(fileobj=io.BytesIO(remote_bundle.build_bundle(suite, dists))) as archive:
        members = archive.getmembers()
        site = zipfile.ZipFile(archive.extractfile(remote_bundle.SITE_ZIP))
    paths = {m.name for m in members}
    assert {"selftests/conftest.py", "selftests/pytest.ini", "selftests/bpfkit/splats.py",
            remote_bundle.SITE_ZIP} <= paths
    assert all(m.isfile() and m.uid == 0 for m in members)
    packaged = set(site.namelist())
    assert {"pytest/__init__.py", "_pytest/main.py", "pluggy/__init__.py"} <= packaged
    assert any(p.startswith("pytest-") and p.endswith(".dist-info/METADATA") for p in packaged)
    for names in (paths, packaged):
        assert not [p for p in names if "__pycache__" in p or p.endswith(".pyc")]


def test_bundle_without_packages_is_the_suite_alone():
    with tarfile.open(fileobj=io.BytesIO(remote_bundle.build_bundle(GUEST_SUITE, []))) as archive:
        assert sorted(archive.getnames()) == ["guest-suite/check_guest.py",
                                              "guest-suite/pytest.ini"]


def test_driver_refuses_members_outside_its_directory(tmp_path):
    for name in ("../escape.py", "/etc/escape.py"):
        bundle = tmp_path / "bundle.tar.gz"
        with tarfile.open(bundle, "w:gz") as archive:
            data = b"print('no')\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        target = tmp_path / "work"
        target.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="refusing bundle member"):
            remote_driver.unpack(str(bundle), str(target))
        assert not (tmp_path / "escape.py").exists()


def test_driver_reads_kmsg_records_like_the_suites_own_reader():
    records = [bytes.fromhex(line) for line in KMSG_RECORDS.read_text().splitlines()
               if line and not line.startswith("#")]
    assert records
    for record in records:
        assert remote_driver.format_record(record) == kmsg.format_record(record)


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"needs {SYSTEM_PYTHON}")
def test_driver_runs_the_pushed_pytest_and_leaves_only_results(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    report = "import json, platform; print(json.dumps([platform.python_version(), " \
             "platform.machine()]))"
    target_env = json.loads(subprocess.run([SYSTEM_PYTHON, "-c", report], capture_output=True,
                                           text=True, check=True).stdout)
    env = dict(environment(target_env[0]), platform_machine=target_env[1])
    dists = remote_bundle.pytest_closure(env)
    (workdir / remote_driver.BUNDLE).write_bytes(remote_bundle.build_bundle(GUEST_SUITE, dists))
    driver = workdir / "remote_driver.py"
    driver.write_bytes(Path(remote_driver.__file__).read_bytes())
    junit = workdir / "junit.xml"
    # A bare environment: only the pushed pytest can be the one that runs.
    # stdin stays open for the whole run: the driver reads its EOF as "the host is gone".
    driver_stdin, held_open = os.pipe()
    try:
        proc = subprocess.run(
            [SYSTEM_PYTHON, str(driver), "--marker", "test", "--deadline", "120",
             "--pushed-pytest", str(workdir), "--", GUEST_SUITE.name, f"--junitxml={junit}",
             "-p", "no:cacheprovider", "-k", "skipped or deliberate"],
            capture_output=True, text=True, timeout=180, check=False, stdin=driver_stdin,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    finally:
        os.close(driver_stdin)
        os.close(held_open)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the deliberate failure
    assert "1 failed, 1 skipped" in proc.stdout
    assert f"pytest-{dists[0].version}" in proc.stdout
    status = json.loads((workdir / remote_driver.STATUS).read_text())
    assert status["pytest_exit"] == 1 and status["driver_error"] is None
    assert status["release"] == os.uname().release
    if os.geteuid() == 0:
        assert status["kernel_log_error"] is None
        assert (workdir / remote_driver.KERNEL_LOG).exists()
    else:
        assert "/dev/kmsg" in status["kernel_log_error"]
    remaining = {p.name for p in workdir.iterdir()}
    assert remaining <= set(remote_driver.RESULT_FILES) and "junit.xml" in remaining

"""The kept guest: its record, stale-record detection and --stop on real processes, then one
real TCG guest kept across two --target runs (and one that makes its kernel print a
backtrace, which must fail the run as a splat) and stopped.

The record tests stand a copy of sleep(1) named qemu-system-x86_64 in for QEMU, so liveness,
pid reuse and the process-group kill are checked on real processes without booting.  The
boot test needs vng, QEMU, root (the guest logs in as root over vng's key) and a bzImage
with sk storage: $SK_STORAGE_SELFTESTS_KERNEL_IMAGE, else the probe build in the default cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import TESTS

from runner.cache import default_cache_dir, open_cache
from runner.commands import pipeline
from runner.errors import ExitCode, UsageError
from runner.preflight import find_tool
from runner.stages.accel import AccelPlan
from runner.targets import keep, remote, ssh

SPLAT_SUITE = TESTS / "fixtures" / "ssh" / "splat-suite"
KERNEL_IMAGE = Path(os.environ.get(
    "SK_STORAGE_SELFTESTS_KERNEL_IMAGE",
    default_cache_dir() / "probe-build" / "arch" / "x86" / "boot" / "bzImage"))


@pytest.fixture
def cache(tmp_path):
    return open_cache(tmp_path / "cache")


@pytest.fixture
def fake_qemu(tmp_path):
    """A process whose name starts with qemu-system, in its own process group."""
    binary = tmp_path / "qemu-system-x86_64"
    shutil.copy(shutil.which("sleep"), binary)
    process = subprocess.Popen([str(binary), "600"], start_new_session=True)
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{process.pid}/comm").read_text().startswith("qemu-system"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def record(cache, pid: int, port: int = 40000) -> keep.KeptGuest:
    start = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    directory = keep.guest_dir(cache)
    directory.mkdir(parents=True, exist_ok=True)
    guest = keep.KeptGuest(pgid=pid, qemu_pid=pid, qemu_start=start, port=port,
                           identity="/nonexistent/id", known_hosts=str(directory / "known_hosts"),
                           kernel="/nonexistent/bzImage", accel="tcg",
                           console_log=str(directory / "console.log"), started_at="now")
    (directory / keep.RECORD).write_text(json.dumps(asdict(guest)))
    (directory / keep.KNOWN_HOSTS).write_text("[127.0.0.1]:40000 ssh-ed25519 AAAA\n")
    return guest


def test_a_running_guest_is_found_and_named_by_its_target(cache, fake_qemu):
    guest = record(cache, fake_qemu.pid)
    assert keep.live_guest(cache) == guest
    assert keep.credentials_for(ssh.parse_target("ssh://root@127.0.0.1:40000"), cache) == guest
    assert keep.credentials_for(ssh.parse_target("ssh://root@localhost:40000"), cache) == guest
    assert keep.credentials_for(ssh.parse_target("ssh://root@127.0.0.1:40001"), cache) is None
    assert keep.credentials_for(ssh.parse_target("ssh://root@192.0.2.1:40000"), cache) is None


def test_a_record_whose_qemu_is_gone_is_cleaned(cache, fake_qemu):
    record(cache, fake_qemu.pid)
    fake_qemu.kill()
    fake_qemu.wait()
    said = []
    assert keep.live_guest(cache, said.append) is None
    assert "is gone" in said[0] and "stale" in said[0]
    assert not (keep.guest_dir(cache) / keep.RECORD).exists()
    assert not (keep.guest_dir(cache) / keep.KNOWN_HOSTS).exists()


def test_a_run_to_a_dead_guest_says_so_and_cleans_its_record(cache, fake_qemu):
    record(cache, fake_qemu.pid)
    fake_qemu.kill()
    fake_qemu.wait()
    said = []
    target = ssh.parse_target("ssh://root@127.0.0.1:40000")
    assert keep.credentials_for(target, cache, said.append) is None
    assert "is gone" in said[0]
    assert keep.load(cache) is None


def test_a_reused_pid_is_never_signalled(cache, tmp_path):
    # The recorded pid now belongs to something else: same pid, not QEMU.
    bystander = subprocess.Popen([shutil.which("sleep"), "600"], start_new_session=True)
    try:
        record(cache, bystander.pid)
        said = []
        assert keep.stop(cache, said.append) == 0
        assert "no kept guest is running" in said[-1]
        assert bystander.poll() is None, "stop must not kill a process that is not the guest"
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_ends_the_whole_process_group(cache, fake_qemu):
    guest = record(cache, fake_qemu.pid)
    said = []
    assert keep.stop(cache, said.append) == 0
    assert fake_qemu.wait(5) is not None
    assert not keep.alive(guest)
    assert f"stopped the guest on port {guest.port}" in said[-1]
    assert not (keep.guest_dir(cache) / keep.RECORD).exists()


def test_stop_without_a_guest_says_so(cache):
    said = []
    assert keep.stop(cache, said.append) == 0
    assert said == ["keep: no kept guest is running"]


def test_an_unreadable_record_is_removed(cache):
    keep.guest_dir(cache).mkdir(parents=True)
    (keep.guest_dir(cache) / keep.RECORD).write_text("{not json")
    said = []
    assert keep.live_guest(cache, said.append) is None
    assert not (keep.guest_dir(cache) / keep.RECORD).exists()
    assert "unreadable" in said[0]


def test_keep_refuses_a_second_guest(cache, fake_qemu):
    record(cache, fake_qemu.pid)
    with pytest.raises(UsageError) as caught:
        keep.start(Path("/nonexistent/bzImage"), AccelPlan("tcg", None, "test"), cache)
    assert "already kept" in caught.value.message and "--stop" in caught.value.message
    assert fake_qemu.poll() is None


BOOT_MISSING = [why for missing, why in (
    (find_tool("vng") is None, "vng"),
    (shutil.which("qemu-system-x86_64") is None, "qemu-system-x86_64"),
    (not KERNEL_IMAGE.is_file(),
     f"a kernel image at {KERNEL_IMAGE} ($SK_STORAGE_SELFTESTS_KERNEL_IMAGE)"),
) if missing]


@pytest.mark.boot
@pytest.mark.skipif(bool(BOOT_MISSING), reason=f"needs {', '.join(BOOT_MISSING)}")
def test_kept_guest_serves_two_runs_without_booting_again_then_stops(cache, tmp_path):
    said: list = []
    guest = keep.start(KERNEL_IMAGE, AccelPlan("tcg", None, "test: TCG"), cache, timeout=600,
                       log=said.append)
    try:
        assert keep.live_guest(cache) == guest
        known = Path(guest.known_hosts).read_text()
        assert f"[127.0.0.1]:{guest.port} ssh-ed25519 " in known
        qemu = guest.qemu_pid
        for run in ("first", "second"):
            out = tmp_path / run
            out.mkdir()
            # Only the target: key, known_hosts and Python come from the record.
            outcome = remote.run_on_target(
                remote.RemoteOptions(target=guest.target(), ssh_config=None, use_agent=False,
                                     use_default_keys=False),
                pipeline.DEFAULT_SUITE, out, markers="not stress",
                keyword="map_create and (canonical or e2big)", timeout=600, log=said.append,
                cache=cache)
            verdict, tests, _, _ = pipeline.judge_output_dir(out, outcome.status)
            assert verdict.exit_code == ExitCode.PASS, (out / "console.log").read_text()
            assert len(tests) == 2
            assert outcome.facts["python"].startswith("/")
            assert (out / "guest-kernel-release").read_text().strip() != os.uname().release
            assert keep.live_guest(cache).qemu_pid == qemu, "a run must not reboot the guest"
        # A backtrace the kernel prints during a run is found in the target's log.
        out = tmp_path / "splat"
        out.mkdir()
        outcome = remote.run_on_target(
            remote.RemoteOptions(target=guest.target(), ssh_config=None, use_agent=False,
                                 use_default_keys=False),
            SPLAT_SUITE, out, timeout=600, log=said.append, cache=cache)
        verdict, tests, splats, _ = pipeline.judge_output_dir(out, outcome.status)
        assert [t.outcome for t in tests] == ["passed"]
        assert verdict.exit_code == ExitCode.SPLAT, (out / "console.log").read_text()
        kernel_log = (out / "console.log").read_text().split(
            "### kernel log of the target since the run started", 1)[1]
        assert "Call Trace" in kernel_log and splats
    finally:
        assert keep.stop(cache, said.append) == 0
    assert not keep.alive(guest)
    assert keep.find_qemu(guest.pgid) is None

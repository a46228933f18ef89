"""A long-lived guest: `--keep` boots the kernel with an SSH server and leaves it up; `--stop` ends it.

The guest is virtme-ng's own SSH mode (`vng --ssh PORT --ssh-tcp`): QEMU
forwards 127.0.0.1:PORT to the guest's sshd, which accepts virtme-ng's
generated client key (~/.cache/virtme-ng/.ssh/id_virtme) and presents host
keys generated on this machine, so the host key is known before the first
connection and is written to a known_hosts file in the cache: runs against the
guest check it strictly, with no trust on first use.

One guest per cache directory, recorded in <cache>/kept-guest/guest.json with
QEMU's pid and start time, so a record whose QEMU is gone (or whose pid was
reused) is recognised as stale and removed instead of trusted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from runner import atomic_file, process_group
from runner.cache import Cache
from runner.errors import InfrastructureError, UsageError
from runner.preflight import Requirement
from runner.stages import boot
from runner.stages.accel import AccelPlan, judge_kvm
from runner.stages.artifacts import CONSOLE_LOG
from runner.targets import ssh

GUEST_DIR = "kept-guest"
RECORD = "guest.json"
KNOWN_HOSTS = "known_hosts"
GUEST_USER = "root"
GUEST_HOST = "127.0.0.1"
# Printed on the guest's console once it is set up for remote runs.
READY_MARKER = "sk-storage-selftests: kept guest ready"
# What the guest runs once booted.  Every remote command starts root's login
# shell, and the guest shares this machine's /root: bash would source the
# developer's ~/.bashrc (pyenv, conda, ...) for each one, which costs tens of
# seconds under TCG and may change which python3 runs.  So root's shell
# becomes /bin/sh in the guest's own copy of /etc/passwd (/etc is a
# copy-on-write overlay in a virtme-ng guest; the host's file is untouched).
IDLE_COMMAND = (r"sed -i 's#^\(root:\([^:]*:\)\{5\}\).*$#\1/bin/sh#' /etc/passwd; "
                f"echo '{READY_MARKER}'; exec sleep infinity")
# Where virtme-ng keeps its SSH client key and the guest's host keys
# (virtme_ng.utils.SSH_DIR); it derives the path from $HOME the same way.
VNG_SSH_DIR = Path("~/.cache/virtme-ng/.ssh")
# Beyond booting: vng generates the keys with ssh-keygen, and the guest runs
# this machine's sshd (and its sftp-server) from the shared filesystem.
KEEP_TOOLS = (
    Requirement("ssh-keygen", command="ssh-keygen", apt="openssh-client"),
    Requirement("sshd", command="sshd", apt="openssh-server"),
)
STOP_GRACE_SECONDS = 10.0
# How often the boot wait rereads the console and retries SSH: a ready guest is
# seen within a quarter second instead of a whole one.
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class KeptGuest:
    """The record of a kept guest: enough to reach it, to tell it is alive, and to stop it."""

    pgid: int
    qemu_pid: int
    qemu_start: int
    port: int
    identity: str
    known_hosts: str
    kernel: str
    accel: str
    console_log: str
    started_at: str

    def target(self) -> str:
        """The --target URL that reaches this guest."""
        return f"ssh://{GUEST_USER}@{GUEST_HOST}:{self.port}"

    def reach_command(self) -> str:
        """The explicit command line for a run against this guest."""
        return shlex.join(["run-selftests", "--target", self.target(), "--identity",
                           self.identity, "--known-hosts", self.known_hosts])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--keep and --stop, added to the plain run's parser."""
    group = parser.add_argument_group("long-lived guest")
    group.add_argument("--keep", action="store_true",
                       help="boot the kernel with an SSH server on 127.0.0.1 and leave it "
                            "running; later --target runs to it pay no boot")
    group.add_argument("--stop", action="store_true",
                       help="shut down the guest started with --keep")


def guest_dir(cache: Cache) -> Path:
    """Where the kept guest's record, known_hosts and console log live."""
    return cache.root / GUEST_DIR


def vng_ssh_dir() -> Path:
    """virtme-ng's SSH directory for this user: its client key and the guest's host keys."""
    return VNG_SSH_DIR.expanduser()


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, a unique identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; starttime is field 22.
    return int(stat.rpartition(")")[2].split()[19])


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has released everything, QEMU's port included)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _process_group_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def find_qemu(pgid: int) -> int | None:
    """The QEMU process in virtme-ng's process group, if it runs."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _comm(int(entry.name)).startswith("qemu-system") \
                and _process_group_of(int(entry.name)) == pgid and _running(int(entry.name)):
            return int(entry.name)
    return None


def alive(guest: KeptGuest) -> bool:
    """True while the recorded QEMU runs: same pid, same start time, still QEMU."""
    return (_process_start(guest.qemu_pid) == guest.qemu_start
            and _comm(guest.qemu_pid).startswith("qemu-system") and _running(guest.qemu_pid))


def load(cache: Cache) -> KeptGuest | None:
    """The recorded guest, alive or not; None when there is no (readable) record."""
    path = guest_dir(cache) / RECORD
    try:
        return KeptGuest(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _forget(cache: Cache) -> None:
    for name in (RECORD, KNOWN_HOSTS):
        (guest_dir(cache) / name).unlink(missing_ok=True)


def live_guest(cache: Cache, log: Callable[[str], None] = print) -> KeptGuest | None:
    """The kept guest if its QEMU still runs; a stale record is removed (and said so)."""
    guest = load(cache)
    if guest is None:
        if (guest_dir(cache) / RECORD).exists():
            log(f"keep: removed an unreadable record {guest_dir(cache) / RECORD}")
            _forget(cache)
        return None
    if alive(guest):
        return guest
    log(f"keep: the kept guest on port {guest.port} is gone (QEMU pid {guest.qemu_pid} no "
        "longer runs); removed its stale record")
    _forget(cache)
    return None


def credentials_for(target: ssh.Target, cache: Cache,
                    log: Callable[[str], None] = print) -> KeptGuest | None:
    """The kept guest when --target names it, so its key and known_hosts apply by default.

    A record whose QEMU is gone is removed here (and said so), so a run to a
    guest that died reads as what it is before the connection is refused.
    """
    guest = live_guest(cache, log)
    if guest is None or target.port != guest.port or target.host not in (GUEST_HOST,
                                                                          "localhost"):
        return None
    return guest


def _free_port() -> int:
    # QEMU binds the port itself; the short window between is harmless on loopback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((GUEST_HOST, 0))
        return probe.getsockname()[1]


def _write_known_hosts(path: Path, port: int) -> bool:
    """known_hosts for the guest from virtme-ng's host keys; False until vng generated them."""
    keys = sorted((vng_ssh_dir() / "etc" / "ssh").glob("ssh_host_*_key.pub"))
    if not keys:
        return False
    lines = []
    for key in keys:
        kind, blob = key.read_text().split()[:2]
        for host in (GUEST_HOST, "localhost"):
            lines.append(f"[{host}]:{port} {kind} {blob}\n")
    path.write_text("".join(lines))
    return True


def _kill_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, virtme-ng's whole process group (vng, virtme-run, QEMU)."""
    process_group.stop(pgid, ((signal.SIGTERM, STOP_GRACE_SECONDS),
                              (signal.SIGKILL, STOP_GRACE_SECONDS)),
                       lambda: find_qemu(pgid) is None and not _running(pgid), poll=0.2)


def _console_tail(console: Path, lines: int = 8) -> list[str]:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _wait_until_reachable(process: subprocess.Popen, console: Path, header_size: int,
                          known_hosts: Path, port: int, accel: str, probe_kvm: bool,
                          deadline: float) -> str:
    """'ready' once the guest's sshd lets us in, 'kvm-broken' to retry with TCG; else raises."""
    identity = vng_ssh_dir() / "id_virtme"
    endpoint = ssh.Endpoint(name=GUEST_HOST, host=GUEST_HOST, port=port, user=GUEST_USER,
                            identities=(identity,), identities_only=True, connect_timeout=5.0)
    started = time.monotonic()
    have_keys = False
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        exited = process.poll() is not None
        if probe_kvm:
            verdict, _ = judge_kvm(text, time.monotonic() - started, exited)
            if verdict == "broken":
                return "kvm-broken"
        if exited:
            raise InfrastructureError(
                f"the kept guest stopped while booting under {accel} (exit status "
                f"{process.returncode}); see {console}", details=_console_tail(console))
        if time.monotonic() >= deadline:
            raise InfrastructureError(
                f"the kept guest did not accept SSH on port {port} within --timeout; "
                f"see {console}", details=_console_tail(console))
        have_keys = have_keys or _write_known_hosts(known_hosts, port)
        # After our own header, which quotes the command and so the marker.
        if have_keys and identity.is_file() and READY_MARKER in text[header_size:]:
            try:
                ssh.connect(endpoint, known_hosts, log=lambda _: None).close()
                return "ready"
            except (ssh.TargetUnreachable, ssh.ConnectionDropped):
                pass  # not up yet: QEMU accepts on the port before the guest's sshd runs
        time.sleep(POLL_SECONDS)


def _spawn_logged(command: list[str], env: dict, cwd: Path, console: Path) -> subprocess.Popen:
    """Start vng in its own session with its output appended to the console log.

    virtme-run hands QEMU /proc/self/fd/1 and /proc/self/fd/2 as chardev *paths*;
    reopening a regular file that way truncates it and writes from offset 0
    over everything else.  A pipe reopens as itself, so vng writes into a pipe
    and cat(1), which outlives this process as vng does, appends it to the log.
    """
    read_end, write_end = os.pipe()
    try:
        with open(console, "ab") as log_file:
            # No inherited stderr: whoever reads this process's output (a pipe, CI)
            # would otherwise wait for the guest to stop.
            logger = subprocess.Popen(["cat"], stdin=read_end, stdout=log_file,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        # Its own session: the guest outlives this process and --stop ends the group.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=write_end,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
    finally:
        os.close(read_end)
        os.close(write_end)
    # cat ends by itself once vng and QEMU close the pipe; reap it if we are still here.
    threading.Thread(target=logger.wait, name="kept-guest-log", daemon=True).start()
    return process


def start(kernel: Path, plan: AccelPlan, cache: Cache, cpus: int = 2, memory: str = "2G",
          timeout: float = 600.0, log: Callable[[str], None] = print,
          vng: str | None = None) -> KeptGuest:
    """Boot the kernel with virtme-ng's SSH server and return once SSH works; it stays up."""
    existing = live_guest(cache, log)
    if existing is not None:
        raise UsageError(f"a guest is already kept ({existing.target()}, QEMU pid "
                         f"{existing.qemu_pid}); stop it first with run-selftests --stop")
    vng = vng or boot.find_vng()
    directory = guest_dir(cache)
    directory.mkdir(parents=True, exist_ok=True)
    console = directory / CONSOLE_LOG
    known_hosts = directory / KNOWN_HOSTS
    env = dict(os.environ)
    # vng starts virtme-run by name: the one beside vng (same venv) must win.
    env["PATH"] = os.path.dirname(vng) + os.pathsep + env.get("PATH", "")
    deadline = time.monotonic() + timeout
    accel, reason = plan.first, plan.reason
    while True:
        port = _free_port()
        command = boot.vng_command(vng, kernel, accel, cpus, memory, [], IDLE_COMMAND)
        command += ["--ssh", str(port), "--ssh-tcp"]
        log(f"keep: booting {kernel} under {accel} ({reason}), SSH on {GUEST_HOST}:{port}")
        header = f"### accel={accel} ({reason})\n### $ {shlex.join(command)}\n"
        console.write_text(header)
        process = _spawn_logged(command, env, directory, console)
        try:
            state = _wait_until_reachable(process, console, len(header), known_hosts, port, accel,
                                          accel == "kvm" and plan.fallback is not None,
                                          deadline)
            qemu = find_qemu(process.pid)
            if state == "ready" and qemu is None:
                raise InfrastructureError(f"the kept guest answers SSH but no QEMU runs in "
                                          f"process group {process.pid}; see {console}")
        except BaseException:
            _kill_group(process.pid)
            process.wait()
            raise
        if state == "kvm-broken":
            _kill_group(process.pid)
            process.wait()
            # KVM is only judged broken when there is a fallback to try (see the probe above).
            assert plan.fallback is not None
            reason = f"auto: fell back to {plan.fallback}: KVM did not boot the guest"
            accel, plan = plan.fallback, AccelPlan(plan.fallback, None, reason)
            log(f"keep: KVM does not work here; retrying with {accel}")
            continue
        break
    assert qemu is not None  # a "ready" guest without QEMU was refused above
    # Reap vng if it dies while this process still runs; after we exit, init does.
    threading.Thread(target=process.wait, name="kept-guest-reaper", daemon=True).start()
    guest = KeptGuest(pgid=process.pid, qemu_pid=qemu, qemu_start=_process_start(qemu) or 0,
                      port=port, identity=str(vng_ssh_dir() / "id_virtme"),
                      known_hosts=str(known_hosts), kernel=str(kernel), accel=accel,
                      console_log=str(console),
                      started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record = directory / RECORD
    atomic_file.write_text(record, json.dumps(asdict(guest), indent=2) + "\n")
    return guest


def describe(guest: KeptGuest) -> list[str]:
    """What --keep prints: where the guest is and how to use and stop it."""
    return [
        (f"keep: the guest is up under {guest.accel} (QEMU pid {guest.qemu_pid}, console "
         f"{guest.console_log})"),
        "keep: run the suite in it with",
        f"  run-selftests --target {guest.target()}",
        (f"  (its key and host key are picked up from the cache; explicitly: "
         f"{guest.reach_command()})"),
        "keep: shut it down with run-selftests --stop",
    ]


def stop(cache: Cache, log: Callable[[str], None] = print) -> int:
    """--stop: end the kept guest's process group and remove its record; 0 if none was running."""
    guest = live_guest(cache, log)
    if guest is None:
        log("keep: no kept guest is running")
        return 0
    # The group is only signalled after alive() matched QEMU's start time, so a
    # reused pid can never be hit.
    _kill_group(guest.pgid)
    if alive(guest):
        raise InfrastructureError(f"QEMU pid {guest.qemu_pid} survived SIGKILL; check it with "
                                  f"ps -p {guest.qemu_pid}")
    _forget(cache)
    log(f"keep: stopped the guest on port {guest.port} (QEMU pid {guest.qemu_pid})")
    return 0

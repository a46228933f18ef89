"""`--target ssh://[user@]host[:port]`: run the suite on another machine and bring the results home.

A run costs a probe (python3, pytest, uid, sudo, a fresh temporary directory),
a push and a fetch (runner.targets.remote_transfer: SFTP, or the exec channel when the
target's server has no SFTP), and the driver (runner.guest.remote_driver), which
unpacks the bundle, runs pytest as root and reads the kernel log from the
moment the run started.  Output streams back live; the pytest exit status
travels on the SSH exit-status channel and in status.json, never parsed from
the output.  The output directory then holds the same files a VM run leaves
(console.log, junit.xml, pytest-exitcode, guest-kernel-release), so the
pipeline judges and reports both the same way.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import select
import shlex
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import paramiko

from runner.cache import Cache
from runner.errors import InfrastructureError, UsageError
from runner.guest import remote_driver
from runner.stages import artifacts, boot
from runner.stages.results import BootStatus
from runner.targets import keep, remote_bundle, remote_transfer, ssh

MIN_PYTHON = (3, 9)
PROBE_TIMEOUT = 120.0
# After the host asks the driver to stop (timeout, stall), how long it may take
# to kill pytest and read the kernel log before the host gives up on it.
STOP_GRACE_SECONDS = 60.0
# Silence after which the host asks the server whether it is still there, and
# how long the answer may take: a dropped link otherwise looks like a stall.
LIVENESS_AFTER_SECONDS = 30.0
LIVENESS_WAIT_SECONDS = 30.0
PROBE_PREFIX = "sk-storage-selftests-probe "
# Runs on the target's python3 before anything is known about it: keep it to
# syntax any python3 parses, so an old one is reported by version, not a trace.
PROBE = r"""
import json, os, platform, subprocess, sys, tempfile
facts = {"uid": os.geteuid(), "python": sys.executable,
         "version": list(sys.version_info[:3]), "release": platform.release(),
         "environment": {
             "implementation_name": sys.implementation.name,
             "implementation_version": platform.python_version(),
             "os_name": os.name, "platform_machine": platform.machine(),
             "platform_python_implementation": platform.python_implementation(),
             "platform_release": platform.release(), "platform_system": platform.system(),
             "platform_version": platform.version(),
             "python_full_version": platform.python_version(),
             "python_version": ".".join(platform.python_version_tuple()[:2]),
             "sys_platform": sys.platform}}
# Where pytest is, not its version: importing it or reading all distribution
# metadata costs tens of seconds on a slow target (a TCG guest reading over 9p).
# pytest names its version in the run's own header.
facts["pytest"] = None
try:
    import importlib.util
    spec = importlib.util.find_spec("pytest")
    facts["pytest"] = spec.origin if spec is not None else None
except Exception:
    pass
facts["sudo"] = None
if facts["uid"] != 0:
    try:
        with open(os.devnull, "r+") as null:
            facts["sudo"] = subprocess.call(["sudo", "-n", "true"], stdin=null, stdout=null,
                                            stderr=null) == 0
    except OSError:
        facts["sudo"] = False
if facts["version"] >= [3, 9] and (facts["uid"] == 0 or facts["sudo"]):
    facts["workdir"] = tempfile.mkdtemp(prefix="sk-storage-selftests-")
print("PREFIX" + json.dumps(facts))
""".replace("PREFIX", PROBE_PREFIX)


class TargetUnsuitable(UsageError):
    """The target is reachable but cannot run the suite (no python3, no root)."""


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach the target, as plain values (from the command line or a test)."""

    target: str
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    target_python: str = "python3"
    ssh_config: Path | None = ssh.DEFAULT_SSH_CONFIG
    use_agent: bool = True
    use_default_keys: bool = True


@dataclass(frozen=True)
class TargetFacts:
    """What the probe learned about the target."""

    uid: int
    python: str
    version: tuple
    release: str
    environment: dict
    pytest: str | None
    sudo: bool | None
    workdir: str | None


@dataclass
class TargetOutcome:
    """How the remote run ended, in the shape of runner.stages.boot.BootOutcome's status values."""

    status: BootStatus  # EXITED, TIMEOUT or STALLED
    detail: str
    seconds: float
    exit_status: int | None
    facts: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --target options, added to the plain run's parser."""
    group = parser.add_argument_group(
        "remote target (run the suite on another machine over SSH instead of booting)")
    group.add_argument("--target", metavar="ssh://[USER@]HOST[:PORT]",
                       help="run the suite on this machine's running kernel, as root (through "
                            "sudo -n when USER is not root); nothing is built or booted")
    group.add_argument("--identity", type=Path, metavar="FILE",
                       help="private key to offer first (the agent, ~/.ssh/config and "
                            "~/.ssh/id_* are tried too)")
    group.add_argument("--known-hosts", type=Path, metavar="FILE",
                       help=f"host keys to trust (default: {ssh.DEFAULT_KNOWN_HOSTS})")
    group.add_argument("--accept-new-host-key", action="store_true",
                       help="trust a host seen for the first time and record its key; a "
                            "changed key is refused regardless")
    group.add_argument("--target-python", default="python3", metavar="CMD",
                       help="Python on the target (default: %(default)s); pytest is pushed "
                            "along when it has none")


def options_from_args(args: argparse.Namespace) -> RemoteOptions | None:
    """The remote options of a parsed command line; None without --target."""
    if not args.target:
        for name in ("identity", "known_hosts"):
            if getattr(args, name):
                raise UsageError(f"--{name.replace('_', '-')} only applies with --target")
        return None
    return RemoteOptions(target=args.target, identity=args.identity,
                         known_hosts=args.known_hosts,
                         accept_new_host_key=args.accept_new_host_key,
                         target_python=args.target_python)


def with_kept_guest_defaults(options: RemoteOptions, cache: Cache | None,
                             log: Callable[[str], None]) -> RemoteOptions:
    """Fill in the key and known_hosts of the --keep guest when --target names it."""
    if cache is None:
        return options
    guest = keep.credentials_for(ssh.parse_target(options.target), cache, log)
    if guest is None:
        return options
    log(f"remote: {options.target} is the kept guest; using its key {guest.identity} and "
        f"host keys {guest.known_hosts}")
    return dataclasses.replace(options, identity=options.identity or Path(guest.identity),
                               known_hosts=options.known_hosts or Path(guest.known_hosts))


def _quiet_command(client: paramiko.SSHClient, command: str, timeout: float) -> tuple:
    """(exit status, stdout, stderr) of a short command; a silent target is a dropped link."""
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        return stdout.channel.recv_exit_status(), out, err
    except (socket.timeout, TimeoutError):
        raise ssh.ConnectionDropped(f"the target did not answer within {timeout:.0f} s while "
                                    "being probed; check its load and the link") from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise ssh.ConnectionDropped(f"the connection dropped while probing the target ({exc})") \
            from None


def probe(client: paramiko.SSHClient, python: str) -> TargetFacts:
    """Find python3, pytest, root or sudo on the target; refuse what cannot run the suite."""
    status, out, err = _quiet_command(client, shlex.join([python, "-c", PROBE]), PROBE_TIMEOUT)
    line = next((ln for ln in out.splitlines() if ln.startswith(PROBE_PREFIX)), None)
    if line is None:
        said = (err.strip().splitlines() or out.strip().splitlines() or [f"exit {status}"])[-1]
        if status == 127 or "not found" in said or "No such file" in said:
            raise TargetUnsuitable(f"the target has no {python} ({said}); install Python "
                                   f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ there or name one with "
                                   "--target-python")
        raise TargetUnsuitable(f"{python} on the target failed to report itself ({said}); "
                               "check it, or name another with --target-python")
    raw = json.loads(line[len(PROBE_PREFIX):])
    facts = TargetFacts(uid=raw["uid"], python=raw["python"], version=tuple(raw["version"]),
                        release=raw["release"], environment=raw["environment"],
                        pytest=raw["pytest"], sudo=raw["sudo"], workdir=raw.get("workdir"))
    if facts.version < MIN_PYTHON:
        raise TargetUnsuitable(f"the target's {facts.python} is Python "
                               f"{'.'.join(map(str, facts.version))}; the suite needs "
                               f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ (--target-python)")
    if facts.uid != 0 and not facts.sudo:
        raise TargetUnsuitable("the login user is not root on the target and `sudo -n true` "
                               "fails there (a password or a tty is required); log in as root "
                               "(ssh://root@...) or allow that user passwordless sudo")
    return facts


class _Console:
    """console.log plus the live echo: whole lines, CR dropped, flushed as they come."""

    def __init__(self, file: TextIO, echo: Callable[[str], None]):
        self.file = file
        self.echo = echo
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""

    def feed(self, data: bytes) -> None:
        """Take raw output; complete lines are logged and echoed, the rest waits."""
        self.pending += self.decoder.decode(data)
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.line(line.replace("\r", ""))

    def line(self, text: str) -> None:
        """One line into console.log (flushed: partial results survive a drop) and the echo."""
        self.file.write(text + "\n")
        self.file.flush()
        self.echo(text)

    def close(self) -> None:
        """Flush a last line that never got its newline (a run cut mid-line)."""
        self.pending += self.decoder.decode(b"", final=True)
        if self.pending:
            self.line(self.pending.replace("\r", ""))
            self.pending = ""


def stream_run(channel: paramiko.Channel, console: _Console, deadline: float,
               stall_timeout: float, liveness_after: float = LIVENESS_AFTER_SECONDS,
               liveness_wait: float = LIVENESS_WAIT_SECONDS,
               ) -> tuple[BootStatus, str, int | None]:
    """Follow the driver's output until it exits: (status, detail, exit status).

    On the deadline or a stall the driver is asked to stop by closing its stdin,
    so it still reports what ran and reads the kernel log.  A connection that
    closes, or stops answering, before the exit status arrives is ConnectionDropped.
    """
    transport = channel.get_transport()
    last_output = last_heard = time.monotonic()
    stopping: tuple[BootStatus, str] | None = None
    give_up_at = None
    silent = False
    while True:
        readable, _, _ = select.select([channel], [], [], 0.5)
        now = time.monotonic()
        if readable or channel.recv_ready():
            data = channel.recv(65536)
            if not data:
                break  # EOF: the driver exited, or the connection went away
            console.feed(data)
            last_output = last_heard = now
            continue
        if not transport.is_active():
            break
        if stopping is None and (now >= deadline or now - last_output >= stall_timeout):
            stopping = ((BootStatus.TIMEOUT, "the run exceeded --timeout") if now >= deadline
                        else (BootStatus.STALLED, f"no output for {stall_timeout:.0f} s"))
            console.line(f"### {stopping[1]}: stopping the run on the target")
            channel.shutdown_write()
            give_up_at = now + STOP_GRACE_SECONDS
        elif give_up_at is not None and now >= give_up_at:
            break
        if now - last_heard >= liveness_after:
            if not ssh.answers(transport, liveness_wait):
                silent = True
                break
            last_heard = time.monotonic()
    console.close()
    if silent:
        raise ssh.ConnectionDropped(f"the target stopped answering in the middle of the run "
                                    f"(no reply within {liveness_wait:.0f} s)")
    # sshd sends EOF when the output closes and the exit status once it has
    # reaped the process, a moment later.  paramiko also sets status_event when
    # the channel closes without one; only exit_status tells them apart.
    settle_until = time.monotonic() + STOP_GRACE_SECONDS
    while not channel.status_event.is_set() and transport.is_active() \
            and time.monotonic() < settle_until:
        channel.status_event.wait(0.1)
    if channel.exit_status != -1:
        status = channel.exit_status
        if stopping:
            return stopping[0], stopping[1], status
        return BootStatus.EXITED, f"the driver exited with status {status}", status
    if not transport.is_active():
        raise ssh.ConnectionDropped("the connection to the target dropped in the middle of the "
                                    "run")
    if stopping:
        why = f"{stopping[1]}; the target did not stop within {STOP_GRACE_SECONDS:.0f} s"
        return stopping[0], why, None
    # The session ended without an exit status: sshd reports death by a signal that way.
    raise InfrastructureError("the runner's driver on the target ended without an exit status "
                              "(killed by a signal?); see console.log")


def _transfer_error(link_ok: bool, message: str) -> InfrastructureError:
    """A failed SFTP push or fetch: a dropped link, or the target refusing the file."""
    return remote_transfer.TransferFailed(message) if link_ok else ssh.ConnectionDropped(message)


def _remove_workdir(client: paramiko.SSHClient, workdir: str, sudo: bool,
                    log: Callable[[str], None]) -> None:
    """Remove the temporary directory (as root when sudo ran the driver, whatever it left)."""
    try:
        command = (["sudo", "-n"] if sudo else []) + ["rm", "-rf", "--", workdir]
        status, _, err = _quiet_command(client, shlex.join(command), PROBE_TIMEOUT)
        if status == 0:
            return
        reason = err.strip() or f"exit {status}"
    except ssh.SshError as exc:
        reason = exc.message
    log(f"remote: could not remove {workdir} on the target ({reason}); remove it by hand")


def run_on_target(options: RemoteOptions, suite: Path, out: Path, markers: str | None = None,
                  keyword: str | None = None, timeout: float = 1800.0,
                  stall_timeout: float = 300.0, log: Callable[[str], None] = print,
                  cache: Cache | None = None, liveness_after: float = LIVENESS_AFTER_SECONDS,
                  liveness_wait: float = LIVENESS_WAIT_SECONDS) -> TargetOutcome:
    """Push the suite, run it as root on the target, and leave a VM run's files in `out`.

    Raises ssh.SshError subclasses for network trouble (partial output stays in
    console.log), TargetUnsuitable when the target cannot run the suite,
    remote_transfer.TransferFailed when it cannot write or read the files.
    """
    started = time.monotonic()
    deadline = started + timeout
    suite = Path(suite).resolve()
    options = with_kept_guest_defaults(options, cache, log)
    target = ssh.parse_target(options.target)
    endpoint = ssh.resolve(target, options.identity, options.ssh_config)
    client = ssh.connect(endpoint, options.known_hosts, options.accept_new_host_key,
                         options.use_agent, options.use_default_keys, log=log)
    facts_out: dict = {"url": target.url(), "endpoint": endpoint.describe()}
    transfer = None
    facts = None
    link_ok = True  # cleanup on a dead or silent link would only hang
    # Until the driver has exited, the work directory is in use: an interrupted
    # run leaves it (closing the connection makes the driver stop pytest).
    driver_running = False
    try:
        server_key = client.get_transport().get_remote_server_key()
        facts_out["host_key"] = ssh.key_description(server_key)
        log(f"remote: connected to {endpoint.describe()} ({facts_out['host_key']})")
        facts = probe(client, options.target_python)
        dists = [] if facts.pytest else remote_bundle.pytest_closure(facts.environment)
        bundle = remote_bundle.build_bundle(suite, dists)
        facts_out.update(
            python=facts.python, python_version=".".join(map(str, facts.version)),
            release=facts.release, sudo=facts.uid != 0, workdir=facts.workdir,
            pytest=f"the target's ({facts.pytest})" if facts.pytest
            else f"{dists[0].version} (pushed)",
            pushed=[f"{d.metadata['Name']}=={d.version}" for d in dists],
        )
        pushed = f", pushing {', '.join(facts_out['pushed'])}" if dists else ""
        log(f"remote: Linux {facts.release}, {facts.python} "
            f"{facts_out['python_version']}, pytest {facts_out['pytest']}{pushed}")
        workdir = facts.workdir
        # The probe makes one whenever the target qualifies; probe() refused the others.
        assert workdir is not None
        try:
            transfer = remote_transfer.open_transfer(client, facts.python, PROBE_TIMEOUT, log)
            facts_out["transfer"] = transfer.name
            transfer.put({remote_driver.BUNDLE: bundle,
                          "remote_driver.py": Path(remote_driver.__file__).read_bytes()}, workdir)
        except ssh.ConnectionDropped:
            link_ok = False
            raise
        except (OSError, paramiko.SSHException, EOFError) as exc:
            link_ok = client.get_transport().is_active()
            raise _transfer_error(link_ok, f"pushing the suite to {workdir} on the target "
                                           f"failed ({exc})") from None
        log(f"remote: pushed {len(bundle) // 1024} KiB to {workdir} over {transfer.name}")

        marker = uuid.uuid4().hex[:12]
        command = (["sudo", "-n"] if facts.uid != 0 else []) + [
            facts.python, f"{workdir}/remote_driver.py", "--marker", marker,
            "--deadline", str(int(timeout + STOP_GRACE_SECONDS)),
        ] + (["--pushed-pytest"] if dists else []) + [
            workdir, "--",
            *boot.pytest_arguments(suite.name, f"{workdir}/{artifacts.JUNIT_FILE}",
                                   markers, keyword)]
        with open(out / artifacts.CONSOLE_LOG, "w", encoding="utf-8") as console_file:
            console = _Console(console_file, log)
            console.line(f"### target {target.url()}: Linux {facts.release}, run {marker}")
            console.line(f"### $ {shlex.join(command)}")
            try:
                channel = client.get_transport().open_session(timeout=PROBE_TIMEOUT)
                channel.set_combine_stderr(True)
                driver_running = True
                channel.exec_command(shlex.join(command))
                status, detail, exit_status = stream_run(
                    channel, console, deadline, stall_timeout, liveness_after, liveness_wait)
                driver_running = exit_status is None
            except ssh.ConnectionDropped as exc:
                link_ok = False
                console.line(f"### {exc.message}")
                raise ssh.ConnectionDropped(
                    f"{exc.message}; partial output is in {out / artifacts.CONSOLE_LOG}, "
                    f"{workdir} is left on the target") from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                link_ok = False
                console.line(f"### connection lost: {exc}")
                raise ssh.ConnectionDropped(
                    f"the connection to the target failed in the middle of the run ({exc}); "
                    f"partial output is in {out / artifacts.CONSOLE_LOG}") from None

            try:
                fetched = transfer.get([remote_driver.STATUS, artifacts.JUNIT_FILE,
                                        remote_driver.KERNEL_LOG], workdir)
            except ssh.ConnectionDropped as exc:
                link_ok = False
                raise ssh.ConnectionDropped(f"{exc.message}; the output so far is in "
                                            "console.log") from None
            except (OSError, paramiko.SSHException, EOFError) as exc:
                link_ok = client.get_transport().is_active()
                raise _transfer_error(link_ok, f"fetching the results from {workdir} failed "
                                               f"({exc}); the output so far is in console.log") \
                    from None
            got_status = remote_driver.STATUS in fetched
            state = json.loads(fetched[remote_driver.STATUS]) if got_status else {}
            if artifacts.JUNIT_FILE in fetched:
                (out / artifacts.JUNIT_FILE).write_bytes(fetched[artifacts.JUNIT_FILE])
            kernel_text = fetched.get(remote_driver.KERNEL_LOG, b"").decode("utf-8", "replace")
            console.file.write("### kernel log of the target since the run started "
                               f"({len(kernel_text.splitlines())} lines)\n{kernel_text}")
            if state.get("kernel_log_lost"):
                console.file.write(f"### {state['kernel_log_lost']} kernel log record(s) were "
                                   "overwritten before they could be read\n")
        facts_out["kernel_log_lost"] = state.get("kernel_log_lost", 0)
        facts_out["stopped_by"] = state.get("stopped")
        (out / artifacts.GUEST_RELEASE_FILE).write_text(state.get("release", facts.release) + "\n")
        if state.get("pytest_exit") is not None:
            (out / artifacts.PYTEST_EXIT_FILE).write_text(f"{state['pytest_exit']}\n")
        if not got_status or state.get("driver_error"):
            why = state.get("driver_error") or "it left no status.json"
            raise InfrastructureError(f"the runner's driver failed on the target ({why}); "
                                      f"see {out / artifacts.CONSOLE_LOG}")
        if state.get("kernel_log_error"):
            # Fail closed: a log that could not be read cannot be called clean.
            raise InfrastructureError(f"cannot read the target's kernel log "
                                      f"({state['kernel_log_error']}), so the run cannot be "
                                      "judged; the suite must run as root")
        return TargetOutcome(status, detail, time.monotonic() - started, exit_status, facts_out)
    finally:
        transport = client.get_transport()
        if facts is not None and facts.workdir:
            if link_ok and not driver_running and transport is not None \
                    and transport.is_active():
                _remove_workdir(client, facts.workdir, facts.uid != 0, log)
            elif link_ok:  # a dropped link already says so in its error
                log(f"remote: {facts.workdir} is left on the target")
        if transfer is not None:
            transfer.close()
        client.close()

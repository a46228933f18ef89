"""--target over real SSH servers on 127.0.0.1: trust, keys, failures, transfers, suite runs.

A module-scoped sshd (Debian's openssh-server) listens on a random port with a
temporary host key and one authorized client key; a second one has no sftp
subsystem, and a dropbear without sftp-server (when installed) is a third, so
the exec-channel transfer is exercised against both ways a target lacks SFTP.  Runs go against this
machine's own kernel, as root, and must reach the same verdict as running the
suite directly.  Every test isolates itself from the user's ~/.ssh and agent.
Needs root (to run sshd and to log in as root) and /usr/sbin/sshd.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, TESTS

from runner.commands import cli, pipeline
from runner.errors import ExitCode, RunnerError
from runner.stages import results
from runner.targets import remote, remote_transfer, ssh

SUITE = REPO / "selftests"
SLOW_SUITE = TESTS / "fixtures" / "ssh" / "slow-suite"
BUSY = "slow-suite: busy"  # what SLOW_SUITE's test prints once it runs
SHELL_NOISE = "noisy-rc: hello from a start-up file"
SSHD = Path("/usr/sbin/sshd")
SMALL_SELECTION = "map_create and (canonical or e2big or clone)"

if os.geteuid() != 0:
    pytest.skip("the SSH-target tests start sshd and log in as root: run them as root",
                allow_module_level=True)
if not SSHD.exists() or shutil.which("ssh-keygen") is None:
    pytest.skip("the SSH-target tests need OpenSSH (apt install openssh-server openssh-client)",
                allow_module_level=True)


@dataclass
class SshServer:
    """A running sshd and the keys around it."""

    port: int
    host_key: Path
    client_key: Path
    stranger_key: Path
    other_host_key: Path
    log: Path
    process: subprocess.Popen

    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def known_hosts_line(self, key: Path | None = None) -> str:
        kind, blob = (key or self.host_key).with_suffix(".pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def session_processes(self) -> list[int]:
        """Every sshd process below the listener: the per-connection monitor and session."""
        found, frontier = [], [self.process.pid]
        while frontier:
            parent = frontier.pop()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                fields = stat.rpartition(")")[2].split()
                if int(fields[1]) == parent:
                    frontier.append(int(entry.name))
                    if "sshd" in stat.partition("(")[2].partition(")")[0]:
                        found.append(int(entry.name))
        return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f",
                    str(path)], check=True)
    return path


def fingerprint(public_key: Path) -> str:
    """The fingerprint as OpenSSH computes it, to compare with the runner's message."""
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def wait_for_port(process: subprocess.Popen, port: int, name: str, log: Path) -> None:
    """Until the server just started accepts on 127.0.0.1:port; fail (its log quoted) if it
    exits or does not listen within 15 s."""
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"{name} did not start: {log.read_text()}")
            time.sleep(0.05)


def start_sshd(directory: Path, sftp: bool = True, pam: bool = False,
               extra: tuple = ()) -> SshServer:
    """sshd on a free port of 127.0.0.1, with or without the sftp subsystem.

    Without PAM, sshd refuses accounts whose password is locked ("!"), as
    service accounts' are; pam lets such a login in with a key.
    """
    host_key = keygen(directory / "host_key")
    client_key = keygen(directory / "client_key")
    authorized = directory / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o644)  # sshd reads it as the login user, who need not be root
    port = free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}", f"PidFile {directory / 'sshd.pid'}",
        f"UsePAM {'yes' if pam else 'no'}", "StrictModes no", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        *(["Subsystem sftp internal-sftp"] if sftp else []), *extra, "LogLevel VERBOSE", "",
    ]))
    # sshd refuses to start without its privilege separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = directory / "sshd.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stderr=stderr)
    wait_for_port(process, port, "sshd", log)
    return SshServer(port=port, host_key=host_key, client_key=client_key,
                     stranger_key=keygen(directory / "stranger_key"),
                     other_host_key=keygen(directory / "other_host_key"), log=log,
                     process=process)


def stop_sshd(server: SshServer) -> None:
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> SshServer:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


@pytest.fixture(scope="module")
def sshd_without_sftp() -> SshServer:
    """A minimal sshd with no Subsystem line, as many embedded and hardened configs have.

    Its files live in a directory every user can read, so that an unprivileged
    login (the no-sudo test) can have its authorized_keys read too.  Every
    command's shell first prints a line, as chatty start-up files do: data on
    stdout must survive that.
    """
    directory = Path(tempfile.mkdtemp(prefix="sk-storage-sshd-", dir="/tmp"))
    directory.chmod(0o755)
    # The login shell prints, then runs the client's command, as a chatty
    # ~/.bashrc would; sshd still refuses the subsystem before any of this.
    chatty = f"ForceCommand echo '{SHELL_NOISE}'; eval \"$SSH_ORIGINAL_COMMAND\""
    # An environment asking for colour: pytest on the target must still write none.
    colour = "SetEnv PY_COLORS=1 FORCE_COLOR=1"
    server = start_sshd(directory, sftp=False, pam=True, extra=(chatty, colour))
    yield server
    stop_sshd(server)
    shutil.rmtree(directory)


@pytest.fixture(autouse=True)
def no_user_ssh_state(tmp_path, monkeypatch):
    """Neither the user's keys, known_hosts, config nor agent may make a test pass."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def known_hosts(tmp_path, sshd) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(sshd.known_hosts_line())
    return path


def options(sshd: SshServer, known_hosts: Path, **changes) -> remote.RemoteOptions:
    values = {"target": sshd.url(), "identity": sshd.client_key, "known_hosts": known_hosts,
              "ssh_config": None, "use_agent": False, "use_default_keys": False}
    values.update(changes)
    return remote.RemoteOptions(**values)


def endpoint(sshd: SshServer, identity: Path | None = None) -> ssh.Endpoint:
    return ssh.resolve(ssh.parse_target(sshd.url()), identity or sshd.client_key, None)


def connect(sshd: SshServer, known_hosts: Path, identity: Path | None = None, **kw):
    return ssh.connect(endpoint(sshd, identity), known_hosts, use_agent=False,
                       use_default_keys=False, log=lambda _: None, **kw)


def direct_run(tmp_path: Path, markers: str, keyword: str | None) -> tuple:
    """The suite run straight on this machine: the reference verdict."""
    junit = tmp_path / "direct.xml"
    command = [sys.executable, "-m", "pytest", str(SUITE), f"--junitxml={junit}", "-p",
               "no:cacheprovider", "-q", "-m", markers]
    if keyword:
        command += ["-k", keyword]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
    tests = results.parse_junit(junit)
    return results.judge("exited", proc.returncode, tests, [], target="ssh"), tests


def remote_run(sshd, known_hosts, out: Path, markers="not stress", keyword=None,
               suite=SUITE, lines: list | None = None, **kw) -> tuple:
    out.mkdir(exist_ok=True)
    changes = {k: kw.pop(k) for k in list(kw) if k in remote.RemoteOptions.__dataclass_fields__}
    outcome = remote.run_on_target(options(sshd, known_hosts, **changes), suite, out,
                                   markers=markers, keyword=keyword,
                                   log=(lines.append if lines is not None else lambda _: None),
                                   **kw)
    verdict, tests, splats, _ = pipeline.judge_output_dir(out, outcome.status, "ssh")
    return outcome, verdict, tests, splats


def outcomes(tests) -> dict:
    return {t.name: t.outcome for t in tests}


def workdirs_of(uid: int) -> set:
    """The runner's temporary directories on this machine owned by uid.

    Other runs of these tests may share the machine, so a test checks the
    directory its own run reported, or (when none was reported) by owner.
    """
    return {p for p in Path("/tmp").glob("sk-storage-selftests-*") if p.stat().st_uid == uid}


def assert_removed(workdir: str) -> None:
    assert workdir.startswith("/tmp/sk-storage-selftests-")
    assert not Path(workdir).exists(), f"the run left {workdir} on the target"


# --- trust and authentication ---------------------------------------------------------------

def test_unknown_host_is_refused_with_its_fingerprint(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(ssh.HostKeyUnknown) as caught:
        connect(sshd, known_hosts)
    message = caught.value.message
    assert fingerprint(sshd.host_key.with_suffix(".pub")) in message
    assert f"[127.0.0.1]:{sshd.port}" in message
    assert "--accept-new-host-key" in message
    assert "\n" not in message
    assert not known_hosts.exists(), "a refused host must not be recorded"


def test_accept_new_host_key_records_it_for_openssh_too(sshd, tmp_path):
    known_hosts = tmp_path / "dir" / "known_hosts"
    said = []
    ssh.connect(endpoint(sshd), known_hosts, accept_new=True, use_agent=False,
                use_default_keys=False, log=said.append).close()
    assert known_hosts.read_text() == sshd.known_hosts_line()
    assert fingerprint(sshd.host_key.with_suffix(".pub")) in said[0]
    # OpenSSH's own lookup finds the recorded key.
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f",
                            str(known_hosts)], capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stdout + found.stderr
    # From now on the host is simply known.
    connect(sshd, known_hosts).close()


def test_changed_host_key_is_refused_even_when_accepting_new_ones(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# kept as is\n" + sshd.known_hosts_line(sshd.other_host_key))
    before = known_hosts.read_text()
    with pytest.raises(ssh.HostKeyChanged) as caught:
        connect(sshd, known_hosts, accept_new=True)
    message = caught.value.message
    assert fingerprint(sshd.host_key.with_suffix(".pub")) in message
    assert fingerprint(sshd.other_host_key.with_suffix(".pub")) in message
    assert "ssh-keygen -R" in message
    assert known_hosts.read_text() == before


def test_wrong_client_key_is_an_authentication_failure(sshd, known_hosts):
    with pytest.raises(ssh.AuthenticationFailed) as caught:
        connect(sshd, known_hosts, identity=sshd.stranger_key)
    assert str(sshd.stranger_key) in caught.value.message
    assert "authorized_keys" in caught.value.message


def test_closed_port_is_refused(known_hosts):
    port = free_port()
    target = ssh.resolve(ssh.parse_target(f"ssh://root@127.0.0.1:{port}"), None, None)
    with pytest.raises(ssh.TargetUnreachable) as caught:
        ssh.connect(target, known_hosts, use_agent=False, use_default_keys=False)
    assert f"127.0.0.1:{port} refused" in caught.value.message


def test_each_connection_failure_is_its_own_infrastructure_error(sshd, tmp_path, known_hosts):
    changed = tmp_path / "changed"
    changed.write_text(sshd.known_hosts_line(sshd.other_host_key))
    attempts = {
        "wrong host key": lambda: connect(sshd, changed),
        "wrong client key": lambda: connect(sshd, known_hosts, identity=sshd.stranger_key),
        "closed port": lambda: ssh.connect(
            ssh.resolve(ssh.parse_target(f"ssh://root@127.0.0.1:{free_port()}"), None, None),
            known_hosts, use_agent=False, use_default_keys=False),
    }
    kinds, messages = set(), set()
    for attempt in attempts.values():
        with pytest.raises(ssh.SshError) as caught:
            attempt()
        assert caught.value.exit_code == ExitCode.INFRASTRUCTURE
        kinds.add(type(caught.value))
        messages.add(caught.value.message)
    assert kinds == {ssh.HostKeyChanged, ssh.AuthenticationFailed, ssh.TargetUnreachable}
    assert len(messages) == 3


def test_ssh_config_supplies_host_port_user_and_key(sshd, known_hosts, tmp_path):
    config = tmp_path / "config"
    config.write_text(f"Host sut\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
                      f"  IdentityFile {sshd.client_key}\n  IdentitiesOnly yes\n")
    resolved = ssh.resolve(ssh.parse_target("ssh://sut"), None, config)
    assert (resolved.host, resolved.port, resolved.user) == ("127.0.0.1", sshd.port, "root")
    assert resolved.known_hosts_name() == f"[127.0.0.1]:{sshd.port}"
    client = ssh.connect(resolved, known_hosts, log=lambda _: None)
    try:
        _, stdout, _ = client.exec_command("id -u")
        assert stdout.read().strip() == b"0"
    finally:
        client.close()


def test_agent_keys_are_offered(sshd, known_hosts, tmp_path, monkeypatch):
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)],
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = dict(os.environ, SSH_AUTH_SOCK=str(socket_path))
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env=env, check=True,
                       capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        no_key = ssh.resolve(ssh.parse_target(sshd.url()), None, None)
        ssh.connect(no_key, known_hosts, use_agent=True, use_default_keys=False).close()
    finally:
        agent.terminate()
        agent.wait(10)


def test_unanswered_connection_times_out_with_a_clear_error(known_hosts, tmp_path):
    config = tmp_path / "config"
    config.write_text("Host 127.0.0.1\n  ConnectTimeout 1\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # One connection nobody accepts fills the backlog; Linux then drops
        # further SYNs, so the next connect hangs as towards a firewalled host.
        with socket.create_connection(("127.0.0.1", port)):
            target = ssh.resolve(ssh.parse_target(f"ssh://root@127.0.0.1:{port}"), None, config)
            started = time.monotonic()
            with pytest.raises(ssh.TargetUnreachable) as caught:
                ssh.connect(target, known_hosts, use_agent=False, use_default_keys=False)
    assert time.monotonic() - started < 10
    assert caught.value.message == (f"connecting to 127.0.0.1:{port} timed out after 1 s; "
                                    "check the address, the port and firewalls")
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE


def user_without_sudo() -> str | None:
    """A local account with a login shell for whom `sudo -n true` fails, if there is one."""
    sudo = shutil.which("sudo")
    for entry in pwd.getpwall():
        if entry.pw_uid == 0 or not entry.pw_shell.endswith("sh"):
            continue
        if sudo is None or subprocess.run(
                ["runuser", "-u", entry.pw_name, "--", sudo, "-n", "true"],
                capture_output=True, check=False).returncode != 0:
            return entry.pw_name
    return None


def test_login_user_without_sudo_is_a_clear_error(sshd_without_sftp, tmp_path):
    user = user_without_sudo()
    if user is None:
        pytest.skip("no local account with a login shell and without passwordless sudo")
    before = workdirs_of(pwd.getpwnam(user).pw_uid)
    with pytest.raises(remote.TargetUnsuitable) as caught:
        remote_run(sshd_without_sftp, known_hosts_for(sshd_without_sftp, tmp_path),
                   tmp_path / "out", target=f"ssh://{user}@127.0.0.1:{sshd_without_sftp.port}")
    assert caught.value.message == (
        "the login user is not root on the target and `sudo -n true` fails there (a password "
        "or a tty is required); log in as root (ssh://root@...) or allow that user "
        "passwordless sudo")
    assert caught.value.exit_code == ExitCode.USAGE
    assert workdirs_of(pwd.getpwnam(user).pw_uid) == before, "the probe made a directory"


def test_target_url_must_be_ssh():
    for text in ("root@host", "http://host", "ssh://", "ssh://host/path", "ssh://host:99999"):
        with pytest.raises(remote.UsageError):
            ssh.parse_target(text)
    assert ssh.parse_target("ssh://me@[::1]:2222") == ssh.Target("::1", "me", 2222)
    assert ssh.parse_target("ssh://me@[::1]:2222").url() == "ssh://me@[::1]:2222"


# --- suite runs against this machine's kernel ------------------------------------------------

def test_selection_gets_the_same_verdict_as_a_direct_run(sshd, known_hosts, tmp_path):
    lines: list = []
    outcome, verdict, tests, splats = remote_run(sshd, known_hosts, tmp_path / "out",
                                                 keyword=SMALL_SELECTION, lines=lines)
    reference, direct_tests = direct_run(tmp_path, "not stress", SMALL_SELECTION)
    assert outcome.status == "exited"
    assert (verdict.exit_code, verdict.label) == (reference.exit_code, reference.label)
    assert outcomes(tests) == outcomes(direct_tests) and len(tests) >= 3
    assert splats == []
    out = tmp_path / "out"
    assert (out / "pytest-exitcode").read_text().strip() == str(outcome.exit_status)
    assert (out / "guest-kernel-release").read_text().strip() == os.uname().release
    console = (out / "console.log").read_text()
    assert "### kernel log of the target since the run started" in console
    # Streamed live: pytest's own lines went through the log callback as they came.
    assert any("test_canonical_map_reports_its_attributes PASSED" in ln for ln in lines)
    assert "\x1b[" not in console, "pytest on the target must not colour console.log"
    # Whatever plugins the target's Python has, none is loaded (pytest lists them here).
    assert not [ln for ln in lines if ln.startswith("plugins:")]
    assert outcome.facts["transfer"] == "sftp"
    assert any(ln.endswith(" over sftp") and ln.startswith("remote: pushed") for ln in lines)
    assert_removed(outcome.facts["workdir"])


def test_full_suite_gets_the_same_verdict_as_a_direct_run(sshd, known_hosts, tmp_path):
    _, verdict, tests, _ = remote_run(sshd, known_hosts, tmp_path / "out")
    reference, direct_tests = direct_run(tmp_path, "not stress", None)
    assert (verdict.exit_code, verdict.label) == (reference.exit_code, reference.label)
    assert outcomes(tests) == outcomes(direct_tests) and len(tests) > 100


def test_target_without_pytest_gets_the_runners_pytest(sshd, known_hosts, tmp_path):
    bare = "/usr/bin/python3"
    has_pytest = subprocess.run([bare, "-c", "import pytest"], capture_output=True,
                                check=False).returncode == 0
    if has_pytest:
        pytest.skip(f"{bare} has pytest here, so nothing would be pushed")
    lines: list = []
    outcome, verdict, _, _ = remote_run(sshd, known_hosts, tmp_path / "out",
                                        keyword=SMALL_SELECTION, target_python=bare,
                                        lines=lines)
    assert outcome.facts["pushed"][0].startswith("pytest==")
    assert {p.split("==")[0].lower() for p in outcome.facts["pushed"]} >= {
        "pytest", "pluggy", "iniconfig", "packaging"}
    assert verdict.exit_code == ExitCode.PASS, "\n".join(lines)
    pushed_version = outcome.facts["pushed"][0].split("==")[1]
    # pytest's own header, printed on the target, names the interpreter and the pushed pytest.
    assert any(ln.endswith(f"-- {bare}") and f"pytest-{pushed_version}" in ln for ln in lines)


def test_target_without_python3_is_a_clear_error(sshd, known_hosts, tmp_path):
    with pytest.raises(remote.TargetUnsuitable) as caught:
        remote_run(sshd, known_hosts, tmp_path / "out", target_python="/nonexistent/python3")
    assert "has no /nonexistent/python3" in caught.value.message
    assert "--target-python" in caught.value.message
    assert caught.value.exit_code == ExitCode.USAGE


def test_deadline_stops_pytest_on_the_target_and_reports_a_timeout(sshd, known_hosts,
                                                                    tmp_path):
    # --timeout counts from the connection, so a short one may pass before the
    # test has started on a loaded machine; such a run must still end as a
    # timeout, and the next, longer one shows pytest itself being stopped.
    for attempt, timeout in enumerate((4, 8, 16, 32, 64)):
        out = tmp_path / f"out{attempt}"
        outcome, verdict, _, _ = remote_run(sshd, known_hosts, out, markers=None,
                                            suite=SLOW_SUITE, timeout=timeout)
        assert outcome.status == "timeout"
        assert outcome.facts["stopped_by"] == "the host ended the run"
        assert verdict.exit_code == ExitCode.TIMEOUT
        # pytest's command line names the work directory (--junitxml).
        assert_none_running(outcome.facts["workdir"])
        assert_removed(outcome.facts["workdir"])
        if BUSY in (out / "console.log").read_text():
            break
    else:
        pytest.fail("the slow test never started within a 64 s deadline")


def assert_none_running(text: str) -> None:
    """No process (but this one) has text in its command line, within a few seconds."""
    deadline = time.monotonic() + 10
    while running_with(text):
        assert time.monotonic() < deadline, f"still running: {running_with(text)}"
        time.sleep(0.05)


def running_with(text: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def run_in_background(sshd, known_hosts, out, **kw) -> tuple:
    """Start a slow-suite run in a thread; returns (thread, lines, box with its exception)."""
    lines: list = []
    box: dict = {}

    def work():
        try:
            remote_run(sshd, known_hosts, out, markers=None, suite=SLOW_SUITE, lines=lines,
                       **kw)
        except RunnerError as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    # The slow test says when it runs: from then on, pytest is busy on the target.
    while not any(BUSY in ln for ln in lines):
        assert thread.is_alive() and time.monotonic() < deadline, (box, lines)
        time.sleep(0.05)
    return thread, lines, box


def workdir_of(lines: list) -> Path:
    (line,) = [ln for ln in lines if ln.startswith("remote: pushed")]
    return Path(line.split(" to ", 1)[1].rsplit(" over ", 1)[0])


def test_connection_cut_mid_run_keeps_partial_output(sshd, known_hosts, tmp_path):
    out = tmp_path / "out"
    thread, lines, box = run_in_background(sshd, known_hosts, out)
    for pid in sshd.session_processes():
        os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert isinstance(box.get("error"), ssh.ConnectionDropped), box
    assert box["error"].exit_code == ExitCode.INFRASTRUCTURE
    assert "dropped in the middle of the run" in box["error"].message
    assert "check_slow.py::test_outlives_the_deadline" in (out / "console.log").read_text()
    # On the target, the driver saw its stdin close and stopped pytest itself.
    workdir = workdir_of(lines)
    status = wait_for_status(workdir)
    assert status["stopped"] == "the host ended the run"
    assert_none_running(str(workdir))
    shutil.rmtree(workdir)


def test_silent_link_is_detected_as_a_drop(sshd, known_hosts, tmp_path):
    out = tmp_path / "out"
    thread, lines, box = run_in_background(sshd, known_hosts, out, liveness_after=1.0,
                                           liveness_wait=2.0)
    frozen = sshd.session_processes()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        thread.join(30)
        assert isinstance(box.get("error"), ssh.ConnectionDropped), box
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
    workdir = workdir_of(lines)
    assert wait_for_status(workdir)["stopped"] == "the host ended the run"
    assert_none_running(str(workdir))
    shutil.rmtree(workdir)


def wait_for_status(workdir: Path) -> dict:
    """The driver's status.json once it appears (renamed into place whole)."""
    deadline = time.monotonic() + 30
    while not (workdir / "status.json").exists():
        assert time.monotonic() < deadline, f"the driver never finished in {workdir}"
        time.sleep(0.05)
    return json.loads((workdir / "status.json").read_text())


# --- the command line ------------------------------------------------------------------------

WIRED = "--target" in cli.build_parser().format_help()
NOT_WIRED = "run-selftests has no --target yet (runner/commands/cli.py wiring pending)"


def run_selftests(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "runner.commands.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(not WIRED, reason=NOT_WIRED)
def test_command_line_target_run_reports_like_a_vm_run(sshd, known_hosts, tmp_path):
    out = tmp_path / "out"
    proc = run_selftests("--target", sshd.url(), "--identity", str(sshd.client_key),
                         "--known-hosts", str(known_hosts), "-k", SMALL_SELECTION,
                         "--output", str(out), home=tmp_path / "home")
    assert proc.returncode == ExitCode.PASS, proc.stdout + proc.stderr
    verdicts = [ln for ln in proc.stdout.splitlines() if ln.startswith("VERDICT:")]
    assert len(verdicts) == 1 and verdicts[0].startswith("VERDICT: PASS - "), proc.stdout
    assert verdicts[0].endswith("(exit 0)")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["verdict"], summary["exit_code"]) == ("pass", 0)
    assert summary["counts"]["passed"] == 3
    assert summary["target"]["release"] == summary["kernel"]["release"] == os.uname().release
    assert summary["boot"]["status"] == "exited"


@pytest.mark.skipif(not WIRED, reason=NOT_WIRED)
def test_command_line_connection_failures_are_one_line_errors(sshd, tmp_path):
    out = tmp_path / "out"
    proc = run_selftests("--target", sshd.url(), "--identity", str(sshd.client_key),
                         "--known-hosts", str(tmp_path / "empty"), "--output", str(out),
                         home=tmp_path / "home")
    assert proc.returncode == ExitCode.INFRASTRUCTURE, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("run-selftests")]
    assert len(errors) == 1, proc.stderr
    assert fingerprint(sshd.host_key.with_suffix(".pub")) in errors[0]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["verdict"], summary["exit_code"]) == ("error", ExitCode.INFRASTRUCTURE)


@pytest.mark.skipif(not WIRED, reason=NOT_WIRED)
def test_command_line_refuses_kernel_options_with_a_target(sshd, tmp_path):
    proc = run_selftests("--target", sshd.url(), "--kernel-image", "/nonexistent",
                         home=tmp_path / "home")
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    assert "--kernel-image" in proc.stderr and "Traceback" not in proc.stderr


def test_interrupted_host_stops_pytest_on_the_target(sshd, known_hosts, tmp_path):
    said: list = []

    def log(line: str) -> None:
        said.append(line)
        if BUSY in line:
            raise KeyboardInterrupt  # Ctrl-C while the slow test runs

    with pytest.raises(KeyboardInterrupt):
        remote.run_on_target(options(sshd, known_hosts), SLOW_SUITE, tmp_path, markers=None,
                             log=log)
    workdir = workdir_of(said)
    assert said[-1] == f"remote: {workdir} is left on the target"
    assert wait_for_status(workdir)["stopped"] == "the host ended the run"
    assert_none_running(str(workdir))
    shutil.rmtree(workdir)


# --- targets without SFTP --------------------------------------------------------------------

def known_hosts_for(server: SshServer, tmp_path: Path) -> Path:
    path = tmp_path / f"known_hosts-{server.port}"
    path.write_text(server.known_hosts_line())
    return path


SFTP_REFUSED = "subsystem request for sftp by user root failed, subsystem not found"


@pytest.mark.parametrize("server_name, kind", [("sshd", remote_transfer.SFTP),
                                               ("sshd_without_sftp", remote_transfer.EXEC)])
def test_files_make_the_round_trip_with_or_without_sftp(server_name, kind, request, tmp_path):
    server = request.getfixturevalue(server_name)
    client = connect(server, known_hosts_for(server, tmp_path))
    directory = Path(tempfile.mkdtemp(prefix="sk-storage-transfer-", dir="/tmp"))
    # Every byte value, more than one SSH window's worth, and nothing at all.
    files = {"bytes.bin": bytes(range(256)) * 64, "big.bin": os.urandom(3 << 20), "empty": b""}
    said: list = []
    try:
        transfer = remote_transfer.open_transfer(client, "python3", 60, said.append)
        assert transfer.name == kind
        transfer.put(files, str(directory))
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
        assert transfer.get([*files, "missing"], str(directory)) == files
        if kind == remote_transfer.EXEC:  # the server's shell really is chatty
            _, stdout, _ = client.exec_command("true")
            assert stdout.read().decode() == SHELL_NOISE + "\n"
        transfer.close()
    finally:
        client.close()
        shutil.rmtree(directory)
    if kind == remote_transfer.EXEC:
        # Chosen because the server said no, and said so in its own log.
        assert said == [("remote: the target's SSH server refused the sftp subsystem; moving "
                         "files through python3 on the exec channel")]
        assert SFTP_REFUSED in server.log.read_text()
    else:
        assert said == []


def test_exec_transfer_failure_names_its_cause(sshd_without_sftp, tmp_path):
    client = connect(sshd_without_sftp, known_hosts_for(sshd_without_sftp, tmp_path))
    missing = f"/tmp/sk-storage-no-such-directory-{os.getpid()}"
    try:
        transfer = remote_transfer.open_transfer(client, "python3", 60, lambda _: None)
        with pytest.raises(remote_transfer.TransferFailed) as caught:
            transfer.put({"bundle": b"x" * 100000}, missing)
        # Names are file names in the directory, never paths out of it.
        with pytest.raises(remote_transfer.TransferFailed) as escaped:
            transfer.put({"../escape": b"x"}, str(tmp_path))
        assert escaped.value.message == (f"writing into {tmp_path} on the target failed "
                                         "(refusing '../escape')")
        assert not (tmp_path.parent / "escape").exists()
        # The link survives a refused write: the next transfer works.
        assert transfer.get(["hostname"], "/etc") == {"hostname": Path("/etc/hostname")
                                                      .read_bytes()}
    finally:
        client.close()
    assert caught.value.message == (f"writing into {missing} on the target failed "
                                    f"({missing}/bundle: No such file or directory)")
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE


@pytest.mark.skipif(not WIRED, reason=NOT_WIRED)
def test_command_line_run_on_a_target_without_sftp(sshd_without_sftp, tmp_path):
    out = tmp_path / "out"
    proc = run_selftests("--target", sshd_without_sftp.url(), "--identity",
                         str(sshd_without_sftp.client_key), "--known-hosts",
                         str(known_hosts_for(sshd_without_sftp, tmp_path)),
                         "-k", SMALL_SELECTION, "--output", str(out), home=tmp_path / "home")
    assert proc.returncode == ExitCode.PASS, proc.stdout + proc.stderr
    assert "refused the sftp subsystem" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"]["transfer"] == remote_transfer.EXEC
    assert (summary["verdict"], summary["counts"]["passed"]) == ("pass", 3)
    # Fetched back over the exec channel: JUnit with the three tests, the target's kernel log.
    assert len(results.parse_junit(out / "junit.xml")) == 3
    console = (out / "console.log").read_text()
    assert "### kernel log of the target since the run started" in console
    # The server's environment sets PY_COLORS=1; --color=no overrides it.
    assert "\x1b[" not in console
    assert SHELL_NOISE in console and "PASSED" in console
    assert SFTP_REFUSED in sshd_without_sftp.log.read_text()
    assert_removed(summary["target"]["workdir"])


DROPBEAR = shutil.which("dropbear")


@dataclass
class DropbearServer:
    """dropbear in a private mount namespace: its own root home, no sftp-server."""

    port: int
    client_key: Path
    known_hosts_line: str
    log: Path
    process: subprocess.Popen

    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def dropbear(tmp_path_factory) -> DropbearServer:
    """dropbear as a minimal target has it: the sftp subsystem granted, but no sftp-server.

    dropbear reads only ~/.ssh/authorized_keys, so root's home is a scratch
    directory, and its sftp-server (/usr/lib/sftp-server, OpenSSH's here) is
    covered with /dev/null: both only inside the server's own mount namespace.
    The scratch home hides root's own Python, so runs use /usr/bin/python3.
    """
    if DROPBEAR is None or shutil.which("unshare") is None:
        pytest.skip("the dropbear test needs dropbear and unshare (apt install dropbear-bin)")
    directory = tmp_path_factory.mktemp("dropbear")
    home = directory / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    client_key = keygen(directory / "client_key")
    authorized = home / ".ssh" / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    host_key = directory / "host_key"
    subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(host_key)], check=True,
                   capture_output=True)
    public = subprocess.run(["dropbearkey", "-y", "-f", str(host_key)], check=True,
                            capture_output=True, text=True).stdout
    kind, blob = next(ln for ln in public.splitlines() if ln.startswith("ssh-")).split()[:2]
    port = free_port()
    hide = " && ".join([f"mount --bind {home} /root"] + [
        f"mount --bind /dev/null {path}" for path in ("/usr/lib/sftp-server",)
        if Path(path).exists()])
    log = directory / "dropbear.log"
    serve = shlex.join([DROPBEAR, "-F", "-E", "-s", "-p", f"127.0.0.1:{port}", "-r",
                        str(host_key), "-P", str(directory / "dropbear.pid")])
    with open(log, "w") as stderr:
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh",
                                    "-c", f"{hide} && exec {serve}"], stderr=stderr)
    wait_for_port(process, port, "dropbear", log)
    yield DropbearServer(port=port, client_key=client_key,
                         known_hosts_line=f"[127.0.0.1]:{port} {kind} {blob}\n", log=log,
                         process=process)
    process.terminate()
    process.wait(10)


def test_dropbear_without_sftp_server_runs_the_suite_over_the_exec_channel(dropbear, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(dropbear.known_hosts_line)
    lines: list = []
    out = tmp_path / "out"
    out.mkdir()
    outcome = remote.run_on_target(
        remote.RemoteOptions(target=dropbear.url(), identity=dropbear.client_key,
                             known_hosts=known, ssh_config=None, use_agent=False,
                             use_default_keys=False, target_python="/usr/bin/python3"),
        SUITE, out, markers="not stress", keyword=SMALL_SELECTION, log=lines.append)
    # dropbear grants the subsystem and then cannot start its server: the
    # SFTP handshake fails on a live link, which also means "no SFTP".
    assert any(ln.startswith("remote: the target's sftp subsystem did not start (")
               for ln in lines), lines
    assert outcome.facts["transfer"] == remote_transfer.EXEC
    verdict, tests, splats, _ = pipeline.judge_output_dir(out, outcome.status)
    assert verdict.exit_code == ExitCode.PASS, "\n".join(lines)
    assert len(tests) == 3 and splats == []
    assert "### kernel log of the target since the run started" in \
        (out / "console.log").read_text()
    assert_removed(outcome.facts["workdir"])

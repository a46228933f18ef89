"""Moving files to and from an SSH target: SFTP when its server offers it, else the exec channel.

Minimal sshd configurations (no `Subsystem sftp` line) and dropbear builds
without an sftp-server refuse the subsystem request; paramiko reports that as
a closed channel on a transport that is still up, which is how it is told
apart from a dropped link.  Such targets get their files through the target's
python3, which a run needs anyway: a tar stream on a command's stdin going
in, one on its stdout coming back.  So the exec channel adds no requirement
(no tar, cat or base64 on the target) beyond what the probe already checked.
"""

from __future__ import annotations

import io
import shlex
import socket
import tarfile
from collections.abc import Callable, Iterable, Mapping

import paramiko

from runner.errors import InfrastructureError
from runner.targets import ssh

SFTP = "sftp"
EXEC = "exec"
# Starts the data SEND writes: anything a login shell's start-up files print
# to stdout comes before it and is skipped.
DATA_MARKER = b"sk-storage-selftests-files\n"

# Both scripts run on the target's python3 (3.9+), as the login user, with the
# directory and file names as (quoted) arguments.
RECEIVE = r"""
import os, shutil, sys, tarfile
root = sys.argv[1]
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
        for member in archive:
            if not member.isfile() or os.path.basename(member.name) != member.name:
                sys.exit("refusing " + repr(member.name))
            with open(os.path.join(root, member.name), "wb") as out:
                shutil.copyfileobj(archive.extractfile(member), out)
except OSError as error:
    sys.exit("%s: %s" % (error.filename or root, error.strerror or error))
"""
SEND = r"""
import os, sys, tarfile
root = sys.argv[1]
try:
    sys.stdout.buffer.write(MARKER)
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as archive:
        for name in sys.argv[2:]:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                archive.add(path, arcname=name, recursive=False)
except OSError as error:
    sys.exit("%s: %s" % (error.filename or root, error.strerror or error))
""".replace("MARKER", repr(DATA_MARKER))


class TransferFailed(InfrastructureError):
    """The target could not write or read a file (disk full, permissions): not the kernel's fault."""


class SftpTransfer:
    """Files over the SFTP subsystem."""

    name = SFTP

    def __init__(self, sftp: paramiko.SFTPClient):
        self.sftp = sftp

    def put(self, files: Mapping[str, bytes], directory: str) -> None:
        """Write each name's bytes into directory on the target."""
        for name, data in files.items():
            with self.sftp.open(f"{directory}/{name}", "wb") as remote_file:
                remote_file.set_pipelined(True)
                remote_file.write(data)

    def get(self, names: Iterable[str], directory: str) -> dict[str, bytes]:
        """The named files of directory that exist on the target, by name."""
        found = {}
        for name in names:
            try:
                with self.sftp.open(f"{directory}/{name}", "rb") as remote_file:
                    found[name] = remote_file.read()
            except FileNotFoundError:
                continue
        return found

    def close(self) -> None:
        """End the SFTP session."""
        self.sftp.close()


class ExecTransfer:
    """Files as tar streams through the target's python3 on the exec channel."""

    name = EXEC

    def __init__(self, client: paramiko.SSHClient, python: str, timeout: float):
        self.client = client
        self.python = python
        self.timeout = timeout

    def put(self, files: Mapping[str, bytes], directory: str) -> None:
        """Write each name's bytes into directory on the target."""
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w|") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
        self._run(RECEIVE, [directory], stream.getvalue(), f"writing into {directory}")

    def get(self, names: Iterable[str], directory: str) -> dict[str, bytes]:
        """The named files of directory that exist on the target, by name."""
        names = list(names)
        what = f"reading from {directory}"
        out = self._run(SEND, [directory, *names], b"", what)
        start = out.find(DATA_MARKER)
        if start < 0:
            raise TransferFailed(f"{what} on the target failed ({self.python} sent no data)")
        found = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(out[start + len(DATA_MARKER):]),
                              mode="r|") as archive:
                for member in archive:
                    extracted = archive.extractfile(member) if member.isfile() else None
                    if extracted is not None and member.name in names:
                        found[member.name] = extracted.read()
        except tarfile.TarError as exc:
            raise TransferFailed(f"{what} on the target failed (damaged data: {exc})") from None
        return found

    def close(self) -> None:
        """Nothing to end: each transfer was its own command."""

    def _run(self, script: str, args: list[str], stdin: bytes, what: str) -> bytes:
        """stdout of python3 -c script args, fed stdin; a failure names its cause in one line."""
        transport = self.client.get_transport()
        try:
            channel = transport.open_session(timeout=self.timeout)
            channel.settimeout(self.timeout)
            # -S: the scripts need only the standard library; skipping site
            # saves start-up time and any .pth side effects on the target.
            channel.exec_command(shlex.join([self.python, "-S", "-c", script, *args]))
            try:
                channel.sendall(stdin)
                channel.shutdown_write()
            except OSError:
                pass  # the command ended early; its exit status and stderr say why
            out = _read_all(channel.recv)
            err = _read_all(channel.recv_stderr)
            status = channel.recv_exit_status()
        except socket.timeout:
            raise ssh.ConnectionDropped(f"the target did not answer within {self.timeout:.0f} s "
                                        f"while {what}; check its load and the link") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ssh.ConnectionDropped(f"the connection dropped while {what} on the target "
                                        f"({exc})") from None
        if status != 0:
            if status == -1 and not transport.is_active():
                raise ssh.ConnectionDropped(f"the connection dropped while {what} on the target")
            said = err.decode("utf-8", "replace").strip().splitlines()
            raise TransferFailed(f"{what} on the target failed "
                                 f"({said[-1] if said else f'exit {status}'})")
        return out


def _read_all(recv: Callable[[int], bytes]) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def open_transfer(client: paramiko.SSHClient, python: str, timeout: float,
                  log: Callable[[str], None] = print) -> SftpTransfer | ExecTransfer:
    """SFTP when the target's server grants the subsystem, else the exec channel (and say why)."""
    transport = client.get_transport()
    try:
        channel = transport.open_session(timeout=timeout)
        channel.settimeout(timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise ssh.ConnectionDropped(f"the connection dropped before the suite could be pushed "
                                    f"({exc})") from None
    try:
        channel.invoke_subsystem("sftp")
    except (paramiko.SSHException, EOFError, OSError) as exc:
        channel.close()
        if not transport.is_active():
            raise ssh.ConnectionDropped(f"the connection dropped while asking for SFTP ({exc})") \
                from None
        log("remote: the target's SSH server refused the sftp subsystem; moving files through "
            f"{python} on the exec channel")
        return ExecTransfer(client, python, timeout)
    try:
        return SftpTransfer(paramiko.SFTPClient(channel))
    except (paramiko.SSHException, EOFError, OSError) as exc:
        # The server granted the subsystem but nothing speaking SFTP answered.
        channel.close()
        if not transport.is_active():
            raise ssh.ConnectionDropped(f"the connection dropped while starting SFTP ({exc})") \
                from None
        log(f"remote: the target's sftp subsystem did not start ({exc}); moving files through "
            f"{python} on the exec channel")
        return ExecTransfer(client, python, timeout)

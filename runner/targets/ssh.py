"""SSH connections to test targets (paramiko): which host to trust, which keys to offer, what failed.

Host keys are checked against a known_hosts file: an unknown host is refused
with its fingerprint and the way to accept it, unless --accept-new-host-key,
which trusts it on first use and records it (OpenSSH's accept-new); a key that
differs from the recorded one is always refused.  Keys come from --identity,
~/.ssh/config (IdentityFile, IdentitiesOnly), the agent and ~/.ssh/id_*, as
with ssh(1).  Each way a connection can fail is its own exception with a
one-line message saying what to do; all are infrastructure errors, because the
kernel under test was never reached.
"""

from __future__ import annotations

import getpass
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paramiko

from runner.errors import InfrastructureError, UsageError

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
SSH_PORT = 22
CONNECT_TIMEOUT = 15.0
# A slow target (a TCG guest, a loaded board) can take a while to greet and
# to check keys; these bound it without cutting such targets off.
BANNER_TIMEOUT = 60.0
AUTH_TIMEOUT = 60.0

# paramiko's transport thread logs every failed handshake with a traceback;
# without a handler, Python prints those to stderr.  The failures reach the
# user as one-line errors instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class SshError(InfrastructureError):
    """The target could not be reached or trusted over SSH."""


class TargetUnreachable(SshError):
    """Refused, timed out, unresolvable, or not speaking SSH."""


class HostKeyUnknown(SshError):
    """The host is not in known_hosts and --accept-new-host-key was not given."""


class HostKeyChanged(SshError):
    """The host offered a key other than the recorded one: never accepted."""


class AuthenticationFailed(SshError):
    """No offered key was accepted by the target."""


class ConnectionDropped(SshError):
    """The connection went away in the middle of a run."""


@dataclass(frozen=True)
class Target:
    """Where to run, as written in --target ssh://[user@]host[:port]."""

    host: str
    user: str | None = None
    port: int | None = None

    def url(self) -> str:
        """Back to the ssh:// form, for messages and summary.json."""
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{host}{port}"


def parse_target(text: str) -> Target:
    """Parse --target; anything but ssh://[user@]host[:port] is a usage error."""
    example = "use ssh://[user@]host[:port], e.g. ssh://root@192.0.2.10:22"
    parts = urlsplit(text)
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.password:
        raise UsageError(f"--target {text!r} is not an SSH URL; {example}")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--target {text!r} has an invalid port; {example}") from None
    return Target(host=parts.hostname, user=parts.username or None, port=port)


@dataclass(frozen=True)
class Endpoint:
    """A target resolved through ~/.ssh/config: what to connect to and with which keys."""

    name: str
    host: str
    port: int
    user: str
    identities: tuple[Path, ...] = ()
    identities_only: bool = False
    proxy_command: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT

    def known_hosts_name(self) -> str:
        """The host's name in known_hosts, as OpenSSH writes it."""
        return self.host if self.port == SSH_PORT else f"[{self.host}]:{self.port}"

    def describe(self) -> str:
        """user@host:port, the resolved address a message should name."""
        return f"{self.user}@{self.host}:{self.port}"


def resolve(target: Target, identity: Path | None = None,
            ssh_config: Path | None = DEFAULT_SSH_CONFIG) -> Endpoint:
    """Apply ~/.ssh/config (HostName, Port, User, IdentityFile, ...) to the target, like ssh(1)."""
    settings: dict = {}
    if ssh_config is not None:
        path = Path(ssh_config).expanduser()
        if path.is_file():
            try:
                settings = paramiko.SSHConfig.from_path(str(path)).lookup(target.host)
            except (paramiko.SSHException, OSError, ValueError) as exc:
                raise UsageError(f"cannot read {path}: {exc}; fix the file or move it aside") \
                    from None
    if "proxyjump" in settings:
        raise UsageError(f"{ssh_config} sets ProxyJump for {target.host}, which this runner does "
                         "not support; use ProxyCommand ssh -W %h:%p JUMPHOST instead")
    identities = []
    if identity is not None:
        identity = Path(identity).expanduser()
        if not identity.is_file():
            raise UsageError(f"--identity {identity} does not exist; name a private key file")
        identities.append(identity)
    # ssh(1) silently skips configured identities that do not exist.
    identities += [Path(p).expanduser() for p in settings.get("identityfile", [])
                   if Path(p).expanduser().is_file()]
    timeout = float(settings["connecttimeout"]) if "connecttimeout" in settings \
        else CONNECT_TIMEOUT
    return Endpoint(
        name=target.host,
        host=settings.get("hostname", target.host),
        port=target.port or int(settings.get("port", SSH_PORT)),
        user=target.user or settings.get("user") or getpass.getuser(),
        identities=tuple(identities),
        identities_only=settings.get("identitiesonly", "no").lower() == "yes",
        proxy_command=settings.get("proxycommand"),
        connect_timeout=timeout,
    )


def key_description(key: paramiko.PKey) -> str:
    """'ssh-ed25519 SHA256:...': the form ssh-keygen -lf prints, so users can compare."""
    return f"{key.get_name()} {key.fingerprint}"


def record_host_key(known_hosts: Path, name: str, key: paramiko.PKey) -> None:
    """Append one known_hosts line, leaving the rest of the file exactly as it was."""
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    prefix = ""
    if known_hosts.exists() and known_hosts.stat().st_size:
        with open(known_hosts, "rb") as existing:
            existing.seek(-1, 2)
            if existing.read(1) != b"\n":
                prefix = "\n"
    with open(known_hosts, "a", encoding="ascii") as out:
        out.write(f"{prefix}{name} {key.get_name()} {key.get_base64()}\n")


class _UnknownHostPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown host with its fingerprint, or trust and record it when asked to."""

    def __init__(self, known_hosts: Path, accept_new: bool, log: Callable[[str], None]):
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.log = log

    def missing_host_key(self, client, hostname, key):
        """paramiko's hook for a host with no recorded key: refuse, or record when asked to."""
        if not self.accept_new:
            raise HostKeyUnknown(
                f"{hostname} is not in {self.known_hosts} and offers {key_description(key)}; "
                "compare that with ssh-keygen -lf on the target's host key, then rerun with "
                "--accept-new-host-key to trust and record it"
            )
        record_host_key(self.known_hosts, hostname, key)
        self.log(f"ssh: trusted {hostname} ({key_description(key)}) on first use; "
                 f"recorded in {self.known_hosts}")


def _auth_failure(endpoint: Endpoint, use_agent: bool, use_default_keys: bool) -> str:
    offered = [str(p) for p in endpoint.identities]
    for path in endpoint.identities:
        try:
            paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            return (f"{path} is passphrase-protected and the agent did not offer it; "
                    f"load it with ssh-add {path} and rerun")
        except (paramiko.SSHException, OSError, ValueError):
            pass
    if use_agent:
        try:
            count = len(paramiko.Agent().get_keys())
        except paramiko.SSHException:
            count = 0
        offered.append(f"{count} agent key(s)")
    if use_default_keys:
        offered.append("~/.ssh/id_*")
    return (f"authentication as {endpoint.describe()} failed (offered: {', '.join(offered)}); "
            "pass --identity FILE with a key in the target's authorized_keys")


def connect(endpoint: Endpoint, known_hosts: Path | None = None, accept_new: bool = False,
            use_agent: bool = True, use_default_keys: bool = True,
            log: Callable[[str], None] = print) -> paramiko.SSHClient:
    """An authenticated client, or one of the SshError subclasses saying exactly what failed."""
    known_hosts = Path(known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    client = paramiko.SSHClient()
    if known_hosts.is_file():
        try:
            client.load_system_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise UsageError(f"cannot read known_hosts {known_hosts}: {exc}; fix it or pass "
                             "--known-hosts FILE") from None
    client.set_missing_host_key_policy(_UnknownHostPolicy(known_hosts, accept_new, log))
    if endpoint.identities_only:
        use_agent = use_default_keys = False
    where = f"{endpoint.host}:{endpoint.port}"
    sock = paramiko.ProxyCommand(endpoint.proxy_command) if endpoint.proxy_command else None
    try:
        client.connect(
            endpoint.host, port=endpoint.port, username=endpoint.user,
            key_filename=[str(p) for p in endpoint.identities] or None,
            allow_agent=use_agent, look_for_keys=use_default_keys,
            timeout=endpoint.connect_timeout, banner_timeout=BANNER_TIMEOUT,
            auth_timeout=AUTH_TIMEOUT, sock=sock,
        )
        return client
    except SshError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyChanged(
            f"the host key of {endpoint.known_hosts_name()} changed: {known_hosts} has "
            f"{key_description(exc.expected_key)}, the target offers {key_description(exc.key)}; "
            "if the target was reinstalled, remove the old entry with "
            f"ssh-keygen -R '{endpoint.known_hosts_name()}' -f {known_hosts} "
            "(--accept-new-host-key never replaces a recorded key)"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise AuthenticationFailed(_auth_failure(endpoint, use_agent, use_default_keys)) \
            from None
    except paramiko.ssh_exception.NoValidConnectionsError:
        client.close()
        raise TargetUnreachable(f"connection to {where} refused; check that sshd runs there "
                                "and listens on that port") from None
    except socket.timeout:
        client.close()
        raise TargetUnreachable(f"connecting to {where} timed out after "
                                f"{endpoint.connect_timeout:.0f} s; check the address, the "
                                "port and firewalls") from None
    except socket.gaierror as exc:
        client.close()
        raise TargetUnreachable(f"cannot resolve {endpoint.host} ({exc.strerror}); check the "
                                "host name in --target") from None
    except paramiko.SSHException as exc:
        client.close()
        if "banner" in str(exc).lower():
            raise TargetUnreachable(f"{where} accepted the connection but sent no SSH greeting "
                                    f"within {BANNER_TIMEOUT:.0f} s; is an SSH server listening "
                                    "on that port?") from None
        raise TargetUnreachable(f"SSH handshake with {where} failed: {exc}") from None
    except OSError as exc:
        client.close()
        raise TargetUnreachable(f"cannot reach {where}: {exc.strerror or exc}") from None


def answers(transport: paramiko.Transport, within: float) -> bool:
    """Whether the server still replies to a request: a silently dropped link shows no error."""
    replied = threading.Event()

    def ask() -> None:
        try:
            # OpenSSH answers any global request, if only to refuse it.
            transport.global_request("keepalive@openssh.com", wait=True)
        except (paramiko.SSHException, OSError, EOFError):
            pass
        finally:
            replied.set()

    threading.Thread(target=ask, name="ssh-liveness", daemon=True).start()
    replied.wait(within)
    return replied.is_set() and transport.is_active()

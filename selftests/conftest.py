"""Suite-wide plumbing: one skip reason when the suite cannot run, shared fixtures, log guard.

The kernel-log guard reads /dev/kmsg after every phase of every test and fails that phase
when the kernel logged a splat (oops, BUG, WARNING, KASAN, lockdep, RCU stall, ...) since
the previous check, quoting the report.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator

import pytest
from bpfkit import btf, cgroup, kmsg, maps, probes, sockets, splats, syscall

NEEDS_ROOT = (
    "the sk storage selftests need root (bpf(2) with CAP_BPF/CAP_SYS_ADMIN, /dev/kmsg, "
    "cgroup2): run them as root"
)


def suite_unavailable_reason() -> str | None:
    """Why nothing in the suite can run here, or None when it can."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    try:
        for feature in ("bpf_syscall", "btf_load", "sk_storage_map"):
            if not probes.has(feature):
                return probes.missing_reason(feature)
    except syscall.BpfError as err:
        return f"bpf(2) is refused here ({err.command}: {err.errno_name}); check lockdown/LSM"
    return None


def lift_memlock_limit() -> None:
    """Kernels before 5.11 charge every BPF map to RLIMIT_MEMLOCK (64 KiB in a guest).

    Maps are freed in deferred work, so without this the charge of earlier
    tests lingers and map creation fails with EPERM in whichever test comes
    next; root may raise the limit, as libbpf-based tools do.
    """
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass  # not root: the suite skips anyway


def pytest_sessionstart(session: pytest.Session) -> None:
    """Lift the memlock limit before any map is created."""
    if os.geteuid() == 0:
        lift_memlock_limit()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test for one stated reason when the suite cannot run at all."""
    reason = suite_unavailable_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        item.add_marker(marker)


# --- kernel-log guard -----------------------------------------------------------------

class _Guard:
    """One session-wide reader of the kernel log, so nothing logged between checks is lost."""

    def __init__(self) -> None:
        self.log: kmsg.KernelLog | None = None
        self.open_error: OSError | None = None
        self.lost_seen = 0

    def start(self) -> None:
        if self.log is None and self.open_error is None:
            try:
                self.log = kmsg.KernelLog()
            except OSError as err:
                self.open_error = err

    def problem(self) -> str | None:
        """A failure message if the kernel log gained a splat since the last call."""
        if self.log is None and self.open_error is None:
            return None  # never started: every test so far was skipped before it ran
        if self.log is None:
            return (
                f"cannot read the kernel log for the splat guard ({self.open_error}); "
                "run the suite as root on a kernel with /dev/kmsg"
            )
        report = splats.find_splats(self.log.read_new())
        if report:
            return splats.describe(report)
        if self.log.lost > self.lost_seen:
            lost, self.lost_seen = self.log.lost - self.lost_seen, self.log.lost
            return f"the kernel log overwrote {lost} record(s) before the guard read them"
        return None


_guard = _Guard()


def _skipped(outcome) -> bool:
    excinfo = outcome.excinfo
    return excinfo is not None and issubclass(excinfo[0], pytest.skip.Exception)


def _check_kernel_log(outcome, phase: str) -> None:
    if _skipped(outcome):
        return
    message = _guard.problem()
    if message is None:
        return
    failure = pytest.fail.Exception(f"kernel log guard ({phase}): {message}", pytrace=False)
    if hasattr(outcome, "force_exception"):
        outcome.force_exception(failure)
    else:  # pluggy < 1.1: an exception raised by the wrapper becomes the phase's outcome
        raise failure


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Start the guard lazily (so a skipped suite never opens /dev/kmsg) and check setup."""
    if not any(m.name == "skip" for m in item.iter_markers()):
        _guard.start()
    outcome = yield
    _check_kernel_log(outcome, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test itself when the kernel splatted while it ran."""
    outcome = yield
    _check_kernel_log(outcome, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Teardown closes sockets and maps, which frees storage: check that too."""
    outcome = yield
    _check_kernel_log(outcome, "teardown")


# --- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def closing() -> Iterator:
    """Register fds to close after the test: `fd = closing(some_call())`."""
    fds: list[int] = []

    def track(fd: int) -> int:
        fds.append(fd)
        return fd

    yield track
    for fd in reversed(fds):
        os.close(fd)


@pytest.fixture
def new_storage_map(closing):
    """Factory for canonical sk storage maps (own BTF, int key); every map is closed after."""

    def make(value_size: int = 8, *, spin_lock: bool = False,
             map_flags: int = syscall.BPF_F_NO_PREALLOC, name: str = "") -> int:
        return closing(maps.create_sk_storage_map(
            value_size, spin_lock=spin_lock, map_flags=map_flags, name=name))

    return make


@pytest.fixture
def storage_map(new_storage_map) -> int:
    """One canonical sk storage map with an 8-byte value."""
    return new_storage_map(8)


@pytest.fixture(scope="session")
def kernel_btf() -> btf.KernelBtf:
    """The running kernel's BTF (type ids of attach targets); skips when the kernel has none."""
    probes.require("kernel_btf")
    return btf.kernel_btf()


@pytest.fixture
def test_cgroup() -> Iterator[cgroup.Cgroup]:
    """A fresh child cgroup2 group, removed after the test."""
    with cgroup.temporary_cgroup("sk-storage-test") as group:
        yield group


@pytest.fixture
def cgroup_fd(test_cgroup, closing) -> int:
    """An O_RDONLY fd of test_cgroup: the target of BPF_PROG_ATTACH."""
    return closing(test_cgroup.open())


class SocketFactory:
    """Makes real loopback sockets and closes every one of them after the test."""

    def __init__(self) -> None:
        self._owned: list[socket.socket] = []

    def _own(self, *socks: socket.socket):
        self._owned.extend(socks)
        return socks[0] if len(socks) == 1 else socks

    def bound(self, family: int, sock_type: int) -> socket.socket:
        """A socket bound to loopback."""
        return self._own(sockets.bound_socket(family, sock_type))

    def plain(self, family: int, sock_type: int) -> socket.socket:
        """A fresh socket, neither bound nor connected."""
        return self._own(socket.socket(family, sock_type))

    def udp_pair(self, family: int) -> tuple[socket.socket, socket.socket]:
        """(sender, receiver) on loopback, the sender connected to the receiver."""
        return self._own(*sockets.udp_pair(family))

    def tcp_listener(self, family: int) -> socket.socket:
        """A listening TCP socket on loopback."""
        return self._own(sockets.tcp_listener(family))

    def tcp_connection(self, family: int, listener: socket.socket | None = None):
        """A TcpConnection (listener, client, accepted) on loopback."""
        conn = sockets.tcp_connection(family, listener)
        self._own(conn.client, conn.accepted)
        if listener is None:
            self._own(conn.listener)
        return conn

    def unix_pair(self, sock_type: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
        """A connected AF_UNIX pair."""
        return self._own(*sockets.unix_pair(sock_type))

    def close_all(self) -> None:
        """Close every socket made (closing twice is harmless)."""
        for sock in reversed(self._owned):
            sock.close()


@pytest.fixture
def socks() -> Iterator[SocketFactory]:
    """Socket factory; all sockets it made are closed after the test."""
    factory = SocketFactory()
    yield factory
    factory.close_all()


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def inet_family(request) -> int:
    """Runs the test over IPv4 and IPv6 (IPv6 skipped where ::1 cannot be bound)."""
    if request.param == socket.AF_INET6:
        probes.require_ipv6()
    return request.param

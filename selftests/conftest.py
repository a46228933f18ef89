"""Suite-wide plumbing: skip reasons that state why, known kernel bugs, fixtures, log guard.

Every skip the suite gives opens with its category ([older kernel], [kernel config],
[environment], [not root]; see bpfkit/probes.py); a feature the running kernel must have
but refuses fails instead. Known kernel bugs (expectations/known_bugs.json) become strict
expected failures on the kernels they affect. The kernel-log guard reads /dev/kmsg after
every phase of every test and fails that phase when the kernel logged a splat (oops, BUG,
WARNING, KASAN, lockdep, RCU stall, ...) since the previous check, quoting the report.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpfkit import btf, cgroup, kernel, kmsg, known_bugs, maps, probes, sockets, splats, syscall

NEEDS_ROOT = (
    f"{probes.NOT_ROOT} the sk storage selftests need root (bpf(2) with CAP_BPF/CAP_SYS_ADMIN, /dev/kmsg, "
    "cgroup2): run them as root"
)


CORE_FEATURES = ("bpf_syscall", "btf_load", "sk_storage_map")


def suite_unavailable_reason() -> str | None:
    """Why nothing in the suite can run here (a stated skip reason), or None when it can.

    A kernel that must have sk storage but refuses it is not a reason to skip: every
    test then fails through the `core_features` fixture, naming the feature and errno.
    """
    if os.geteuid() != 0:
        return NEEDS_ROOT
    for feature in CORE_FEATURES:
        probe = probes.status(feature)
        if probe.present:
            continue
        action, message = probes.judge_missing(feature, probe, kernel.running(), kernel.config())
        if action == "skip":
            return message
        return None
    return None


@pytest.fixture(autouse=True)
def core_features() -> None:
    """Every test needs bpf(2), BTF and sk storage maps: fail (or skip) it with the reason."""
    for feature in CORE_FEATURES:
        probes.require(feature)


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


def pytest_addoption(parser: pytest.Parser) -> None:
    """--kernel-backports: known-bug fixes the kernel carries as patches (the runner passes them)."""
    parser.addoption(
        "--kernel-backports", default=os.environ.get("SK_STORAGE_BACKPORTS", ""),
        help="comma-separated upstream commit ids of known-bug fixes the running kernel "
             "carries as patches (default: $SK_STORAGE_BACKPORTS); their tests are expected "
             "to pass")
    parser.addoption(
        "--known-bugs", default=str(known_bugs.REGISTRY_FILE),
        help="the known-bug registry (default: selftests/expectations/known_bugs.json)")


def known_bug_marker(bug: known_bugs.KnownBug) -> pytest.MarkDecorator:
    """A strict xfail that says what to do when the test starts passing."""
    where = bug.fix or "the entry"
    return pytest.mark.xfail(
        strict=True,
        reason=(f"known bug, {bug.fixed_by}; if this test passes, the kernel is fixed: "
                f"update or retire {where} in selftests/expectations/known_bugs.json"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip everything for one stated reason when the suite cannot run; mark known bugs."""
    reason = suite_unavailable_reason()
    if reason is not None:
        marker = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(marker)
        return
    try:
        backports = known_bugs.parse_backports(config.getoption("--kernel-backports"))
    except ValueError as err:
        raise pytest.UsageError(f"--kernel-backports: {err}") from None
    bugs = known_bugs.load_registry(Path(config.getoption("--known-bugs")))
    identity, heap_init = kernel.running(), kernel.heap_init_on_alloc()
    for item in items:
        bug = known_bugs.bug_for(item.nodeid, bugs, identity, backports, heap_init)
        if bug is not None:
            item.add_marker(known_bug_marker(bug))
            item.stash[_KNOWN_BUG] = bug


_KNOWN_BUG = pytest.StashKey[known_bugs.KnownBug]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """An expected failure must fail the way its known bug does; anything else is a failure."""
    outcome = yield
    report = outcome.get_result()
    bug = item.stash.get(_KNOWN_BUG, None)
    if bug is None or not hasattr(report, "wasxfail") or not report.skipped:
        return
    if call.excinfo is None:
        return
    failure = f"{call.excinfo.typename}: {call.excinfo.value}"
    if bug.explains(failure):
        report.wasxfail = f"{report.wasxfail} | failed as expected: {failure.splitlines()[0]}"
        return
    report.outcome = "failed"
    del report.wasxfail
    report.longrepr = (
        f"failed, but not the way known bug {bug.fix or bug.subject} fails "
        f"(expected /{bug.fails_with}/):\n{item.repr_failure(call.excinfo)}")


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


def _force(outcome, exception: BaseException) -> None:
    """Replace a hook phase's outcome with `exception`."""
    if hasattr(outcome, "force_exception"):
        outcome.force_exception(exception)
    else:  # pluggy < 1.1: an exception raised by the wrapper becomes the phase's outcome
        raise exception


def _policy_refusal_as_skip(outcome, refusals_before: int) -> None:
    """A phase during which the host refused root with EPERM proves nothing either way:
    it becomes a stated [environment] skip, even when the test caught the refusal."""
    if syscall.PolicyRefused.raised == refusals_before or _skipped(outcome):
        return
    err = syscall.PolicyRefused.last
    _force(outcome, pytest.skip.Exception(
        f"{probes.ENVIRONMENT} this host refused {err.command} to root with "
        f"{err.errno_name}: lockdown, an LSM or a sandbox policy", _use_item_location=True))


def _check_kernel_log(outcome, phase: str) -> None:
    if _skipped(outcome):
        return
    message = _guard.problem()
    if message is None:
        return
    _force(outcome, pytest.fail.Exception(f"kernel log guard ({phase}): {message}", pytrace=False))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Start the guard lazily (so a skipped suite never opens /dev/kmsg) and check setup."""
    if not any(m.name == "skip" for m in item.iter_markers()):
        _guard.start()
    refusals = syscall.PolicyRefused.raised
    outcome = yield
    _policy_refusal_as_skip(outcome, refusals)
    _check_kernel_log(outcome, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test itself when the kernel splatted while it ran."""
    refusals = syscall.PolicyRefused.raised
    outcome = yield
    _policy_refusal_as_skip(outcome, refusals)
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

"""Concurrency stress: map free racing socket close, and update racing delete on one socket.

The map-free race runs threads (ctypes and close() drop the GIL while in the kernel,
and the map itself is freed by a kernel worker concurrently with them); the one-socket
race forks processes, so updates and deletes overlap in the kernel on both CPUs.  Each
test also reads the kernel log itself and fails on any splat, on top of the guard.

Each race runs at two scales. `quick` is in the default selection, sized to finish in
a few seconds under QEMU TCG emulation; `full` carries the `stress` marker and takes its
scale from the environment (defaults finish in about 30 s under TCG, about 1 s on the
2-core development machine):
  SK_STORAGE_STRESS_THREADS  workers per race: threads in the map-free race, processes
                             in the one-socket race (default 4)
  SK_STORAGE_STRESS_SOCKETS  sockets per worker in the map-free race (default 48)
  SK_STORAGE_STRESS_ROUNDS   rounds of the map-free race (default 10)
  SK_STORAGE_STRESS_OPS      update/delete calls per worker in the one-socket race
                             (default 30000)
  SK_STORAGE_STRESS_BALLAST  sockets whose elements the map-free race's free must walk
                             (default 512)
  SK_STORAGE_STRESS_TIMEOUT  seconds before a hung race process fails the test (default 300)
  SK_STORAGE_CLEANUP_TIMEOUT seconds to wait for deferred frees (default 30)

A race passes only if it is seen to have raced: the map-free race needs a round in
which a worker closed sockets while the map's free was still unlinking elements,
the one-socket race needs a delete that succeeded after another delete (so an update
landed between them).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from bpfkit import charges, elements, kmsg, maps, sockdiag, sockets, splats, syscall


def _scale(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r} is not a whole number; set it to e.g. {default}")
    if value < 1:
        raise pytest.UsageError(f"{name}={value} must be at least 1")
    return value


@dataclass(frozen=True)
class Scale:
    """How hard one race pushes: workers, sockets per worker, rounds, calls per worker."""

    threads: int
    sockets: int
    rounds: int
    ops: int
    ballast: int  # sockets that keep their element until the map is freed under them


FULL = Scale(threads=_scale("SK_STORAGE_STRESS_THREADS", 4),
             sockets=_scale("SK_STORAGE_STRESS_SOCKETS", 48),
             rounds=_scale("SK_STORAGE_STRESS_ROUNDS", 10),
             ops=_scale("SK_STORAGE_STRESS_OPS", 30000),
             ballast=_scale("SK_STORAGE_STRESS_BALLAST", 512))
# Seconds under TCG, yet every race still overlaps (each test checks that it did).
QUICK = Scale(threads=2, sockets=16, rounds=3, ops=3000, ballast=256)
CLEANUP_TIMEOUT = float(os.environ.get("SK_STORAGE_CLEANUP_TIMEOUT", "30"))
# How long the one-socket race may go on past its calls waiting to be seen racing.
RACE_BUDGET = 10.0
# A race that has not ended by then is hung in the kernel, not slow.
RACE_TIMEOUT = float(os.environ.get("SK_STORAGE_STRESS_TIMEOUT", "300"))
VALUE_SIZE = 16
# A worker that fails before the barrier must not leave the others waiting forever:
# they give up with BrokenBarrierError and the first worker's own error is reported.
BARRIER_TIMEOUT = 120.0


@pytest.fixture(params=[pytest.param(QUICK, id="quick"),
                        pytest.param(FULL, id="full", marks=pytest.mark.stress)])
def scale(request) -> Scale:
    """The race's size: `quick` runs by default, `full` behind the stress marker."""
    return request.param


@pytest.fixture
def no_splat():
    """Fail the test if the kernel logged a splat while it ran (read here, not only by the guard)."""
    with kmsg.KernelLog() as log:
        yield
        found = splats.find_splats(log.read_new())
        assert not found, splats.describe(found)
        assert log.lost == 0, f"{log.lost} kernel log records were overwritten unread"


def run_threads(workers: list[Callable[[], None]]) -> None:
    """Run each worker in its own thread; re-raise the first failure after all have ended."""
    failures: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - reported in the main thread
            failures.append(err)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def worker_sockets(family: int, count: int) -> list[socket.socket]:
    """Half UDP sockets, half TCP: connected clients with their accepted children."""
    made = [sockets.bound_socket(family, socket.SOCK_DGRAM) for _ in range(count - count // 2)]
    listener = sockets.tcp_listener(family, backlog=count)
    try:
        for _ in range(count // 4):
            conn = sockets.tcp_connection(family, listener)
            made += [conn.client, conn.accepted]
    finally:
        listener.close()
    return made


def free_pending(watched: list[tuple[socket.socket, int]]) -> bool:
    """Whether any watched socket is still charged above its baseline (SO_MEMINFO: fast)."""
    return any(charges.optmem_now(sock) > baseline for sock, baseline in watched)


def map_free_round(round_number: int, families: list[int], scale: Scale) -> bool:
    """One round: workers give storage to their sockets, then drop the map and close.

    Every worker but this round's freer drops its map fd while closing the first half
    of its sockets; then the freer drops the last reference, and the kernel frees the
    map (unlinking every element) in a worker of its own while the others close their
    second half.  Ballast sockets, kept open, give the free more elements to walk.
    Returns whether the round raced: right before or right after a worker closed its
    second half, a watched socket was still charged (the free had not reached it yet).
    """
    map_fd = maps.create_sk_storage_map(VALUE_SIZE, name="stress_free")
    map_id = maps.map_info(map_fd).id
    ballast = [sockets.bound_socket(families[0], socket.SOCK_DGRAM) for _ in range(scale.ballast)]
    ballast_baselines = [charges.optmem_now(sock) for sock in ballast]
    for n, sock in enumerate(ballast):
        maps.update(map_fd, sock.fileno(), struct.pack("=QQ", round_number, n))
    worker_fds = [os.dup(map_fd) for _ in range(scale.threads)]
    os.close(map_fd)
    freer = round_number % scale.threads
    start = threading.Barrier(scale.threads, timeout=BARRIER_TIMEOUT)
    handover = threading.Barrier(scale.threads, timeout=BARRIER_TIMEOUT)
    released = threading.Event()
    survivors: list[socket.socket] = list(ballast)
    survivor_baselines: list[int] = list(ballast_baselines)
    # Elements sit in hash buckets, which the free walks in order: watch a spread of them.
    watched_ballast = list(zip(ballast, ballast_baselines))[::max(1, len(ballast) // 8)]
    free_unfinished: list[bool] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        family = families[index % len(families)]
        mine = worker_sockets(family, scale.sockets)
        baseline = charges.optmem_now(mine[0])
        for n, sock in enumerate(mine):
            maps.update(worker_fds[index], sock.fileno(),
                        struct.pack("=QQ", round_number, index << 32 | n))
        start.wait()
        # Close every other socket and (all but the freer) give up the map; then the freer
        # drops the last reference while the rest close, all but one UDP socket, which
        # outlives the map and must get its memory back.
        for sock in mine[1::2]:
            sock.close()
        if index != freer:
            os.close(worker_fds[index])
        handover.wait()
        if index == freer:
            os.close(worker_fds[index])
            released.set()
        else:
            assert released.wait(BARRIER_TIMEOUT), "the freer never dropped the map"
        # A watched socket still charged: the map's free has not unlinked its element yet.
        # Seen right before or right after this worker's closes, the closes overlapped it.
        watched = [(mine[0], baseline), *watched_ballast]
        before = index != freer and free_pending(watched)
        for sock in mine[2::2]:
            sock.close()
        after = index != freer and free_pending(watched)
        with lock:
            free_unfinished.append(before or after)
            survivors.append(mine[0])
            survivor_baselines.append(baseline)

    try:
        run_threads([lambda i=i: worker(i) for i in range(scale.threads)])
        reached, _ = elements.wait_for(
            lambda: int(map_id not in maps.map_ids()), 1, CLEANUP_TIMEOUT)
        assert reached, f"round {round_number}: map id {map_id} outlived its last fd"
        reached, last = elements.wait_for(
            lambda: sum(charges.optmem_now(s) for s in survivors),
            sum(survivor_baselines), CLEANUP_TIMEOUT)
        assert reached, (f"round {round_number}: survivors charged {last} bytes, "
                         f"{sum(survivor_baselines)} before they had storage")
    finally:
        for sock in survivors:
            sock.close()
    return any(free_unfinished)


def test_map_freed_while_sockets_close_concurrently(scale, no_splat):
    """Threads give storage to their sockets, then drop map refs and close sockets at once."""
    families = [socket.AF_INET, socket.AF_INET6] if sockets.ipv6_available() else [
        socket.AF_INET]
    raced = sum(map_free_round(n, families, scale) for n in range(scale.rounds))
    # Every round checked the cleanup; at least one must have had sockets closing while
    # the map's free was still under way, or the test proved nothing about the race.
    assert raced >= 1, (f"in none of {scale.rounds} rounds did a worker close sockets "
                        "before the map's free had reached its own: nothing raced")
    print(f"map-free race: in {raced} of {scale.rounds} rounds sockets closed mid-free")


def run_processes(workers: list[Callable[[], object]], timeout: float) -> list[object]:
    """Run each worker in a forked child at once; return their JSON results in order.

    Threads would take turns on the GIL between bpf(2) calls; processes race for real.
    A child still running at the deadline is killed and fails the test.
    """
    children = []
    # Every child blocks reading this pipe; closing its write end releases all at once, so
    # the first child forked has not finished before the last one starts.
    go_read, go_write = os.pipe()
    for work in workers:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            os.close(go_write)
            os.read(go_read, 1)
            status = 0
            try:
                payload = {"ok": True, "value": work()}
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                payload = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                status = 1
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(payload))
            os._exit(status)
        os.close(write_fd)
        children.append((pid, read_fd))
    os.close(go_read)
    os.close(go_write)
    deadline = time.monotonic() + timeout
    results = []
    try:
        for pid, read_fd in children:
            chunks = []
            while True:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([read_fd], [], [], max(remaining, 0))
                if not ready:
                    raise AssertionError(f"stress child {pid} still running after {timeout:g} s")
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
            payload = json.loads(b"".join(chunks) or b'{"ok": false, "error": "no result"}')
            assert payload["ok"], f"stress child {pid} failed: {payload['error']}"
            results.append(payload["value"])
    finally:
        for pid, read_fd in children:
            os.close(read_fd)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    return results


def test_update_racing_delete_on_one_socket(scale, storage_map, socks, no_splat):
    """Updaters and deleters on one socket fail only with EAGAIN/ENOENT; lookups never tear."""
    sock = socks.bound(socket.AF_INET, socket.SOCK_DGRAM)
    baseline = sockdiag.socket_record(sock).optmem
    # Each value repeats one byte, so a value made of two writes would show.
    values = [bytes([0x11 * (i + 1)]) * 8 for i in range(4)]

    updaters = max(1, scale.threads // 2)
    deleters = max(1, scale.threads - updaters)
    # Each deleter counts its successful deletes here, shared across the fork, so that
    # every worker goes on past its `ops` calls until two deletes succeeded (an update
    # landed between them) or RACE_BUDGET runs out: on a fast host one process can
    # finish all its calls before the other is even scheduled.
    deleted = mmap.mmap(-1, 8 * deleters)
    give_up_at = time.monotonic() + RACE_BUDGET

    def interleaved() -> bool:
        return sum(struct.unpack(f"={deleters}Q", deleted[:])) >= 2

    def keep_going(n: int) -> bool:
        return n < scale.ops or (not interleaved() and time.monotonic() < give_up_at)

    def updater(index: int) -> dict[str, int]:
        outcomes: Counter = Counter()
        n = 0
        while keep_going(n):
            try:
                maps.update(storage_map, sock.fileno(), values[(index + n) % len(values)])
                outcomes["update ok"] += 1
            except syscall.BpfError as err:
                outcomes[f"update {syscall.errno_name(err.errno)}"] += 1
            n += 1
        return dict(outcomes)

    def deleter(index: int) -> dict[str, int]:
        outcomes: Counter = Counter()
        n = 0
        while keep_going(n):
            try:
                maps.delete(storage_map, sock.fileno())
                outcomes["delete ok"] += 1
                struct.pack_into("=Q", deleted, 8 * index, outcomes["delete ok"])
            except syscall.BpfError as err:
                outcomes[f"delete {syscall.errno_name(err.errno)}"] += 1
            n += 1
        return dict(outcomes)

    def reader() -> list[str]:
        seen = set()
        for _ in range(scale.ops):
            try:
                seen.add(maps.lookup(storage_map, sock.fileno(), 8).hex())
            except syscall.BpfError as err:
                if err.errno != errno.ENOENT:
                    raise
        return sorted(seen)

    *counts, seen = run_processes(
        [lambda i=i: updater(i) for i in range(updaters)]
        + [lambda i=i: deleter(i) for i in range(deleters)] + [reader],
        timeout=RACE_TIMEOUT)
    outcomes: Counter = Counter()
    for count in counts:
        assert sum(count.values()) >= scale.ops, count
        outcomes.update(count)

    allowed = {"update ok", "delete ok", "update EAGAIN", "delete ENOENT"}
    assert set(outcomes) <= allowed, f"unexpected outcomes: {dict(outcomes)}"
    # Two successful deletes need an update between them: only then did the calls race.
    assert outcomes["delete ok"] >= 2, (
        f"updates and deletes never interleaved, nothing raced: {dict(outcomes)}")
    torn = {bytes.fromhex(v) for v in seen} - set(values)
    assert not torn, f"torn or foreign values read: {torn}"

    # Whatever won last, the socket, its memory and the map agree on it.
    try:
        final = maps.lookup(storage_map, sock.fileno(), 8)
    except syscall.BpfError as err:
        assert err.errno == errno.ENOENT
        final = None
    charged = sockdiag.socket_record(sock).optmem
    if final is None:
        assert charged == baseline, f"no element left, yet {charged - baseline} bytes charged"
    else:
        assert final in values
        element = charges.kernel_charges().first_element(maps.map_info(storage_map).value_size)
        assert charged - baseline == element, (
            f"one element left, charged {charged - baseline} bytes instead of {element}")
    maps.update(storage_map, sock.fileno(), values[0])
    maps.delete(storage_map, sock.fileno())
    assert sockdiag.socket_record(sock).optmem == baseline
    print(f"one-socket race outcomes: {dict(outcomes)}")

"""The sk storage commit's benchmark (6ac99e8f23d4): a per-socket egress counter, two ways.

A cgroup_skb egress program bumps a u32 counter for the sending socket on every packet,
keeping it either in a BPF hash map keyed by bpf_get_socket_cookie() or in sk storage.
Traffic is a fixed number of datagrams over N connected UDP sockets on loopback (4096 as
in the commit, which drove them with netperf), sent round-robin by default so every packet
touches a different, cache-cold socket; --burst K sends K in a row per socket instead.  With run-time statistics on, the kernel times each program run;
ns per run is the run_time_ns/run_cnt delta over the measured phase.

Nothing is reported unless it is proven right first: every socket's counter must equal
the datagrams it sent and run_cnt must equal the total, else the run fails.  The JSON
result goes to stdout (or --output); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import resource
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Callable

from bpfkit import cgroup, maps, probes, prog, syscall
from bpfkit.asm import (
    ADD,
    DW,
    JEQ,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R10,
    W,
    alu64_imm,
    assemble,
    atomic_add,
    call,
    exit_insn,
    ja,
    jmp_imm,
    label,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
    stx_mem,
)

from bench import perf_counters, stats

SCHEMA = 1
# The commit message's numbers: 4096 connected UDP sockets driven by netperf.
SEED = {"commit": "6ac99e8f23d4", "sockets": 4096, "ns_per_run": {"hash": 152, "sk_storage": 66}}
VARIANTS = ("hash", "sk_storage")
HASH_MAX_ENTRIES = 8192  # as in the seed; raised to the socket count when that is larger
DEFAULT_SOCKETS = 4096
DEFAULT_PACKETS = 200_000
DEFAULT_REPEATS = 5
SWEEP = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PAYLOAD = b"egress-counter\n"
# fds besides the senders: receiver, maps, programs, stats, cgroup, Python's own.
FD_HEADROOM = 64

EXIT_OK, EXIT_FAILED, EXIT_CANNOT_RUN = 0, 1, 2

SKB_SK = 168  # offsetof(struct __sk_buff, sk)
SO_COOKIE = 57  # asm-generic/socket.h (x86, arm64, riscv)
EGRESS = syscall.BPF_CGROUP_INET_EGRESS
ALLOW = 1


class BenchmarkFailed(Exception):
    """The measurement cannot be trusted (counters disagree with the traffic); no numbers."""


class CannotRun(Exception):
    """This system cannot run the benchmark at all (not root, kernel lacks the feature...)."""


# --- the two programs -------------------------------------------------------------------

def hash_program(map_fd: int) -> bytes:
    """counter = hash[cookie(skb)]; create it at 1 when absent, else add 1 atomically."""
    return assemble([
        mov64_reg(R6, R1),                  # r6 = skb (ctx)
        call("get_socket_cookie"),          # r0 = cookie of skb->sk (0 without a socket)
        stx_mem(DW, R10, R0, -8),           # key = cookie at fp-8
        ld_map_fd(R1, map_fd),
        mov64_reg(R2, R10),
        alu64_imm(ADD, R2, -8),             # r2 = &key
        call("map_lookup_elem"),
        jmp_imm(JEQ, R0, 0, "create"),
        label("bump"),
        mov64_imm(R1, 1),
        atomic_add(W, R0, R1, 0),           # lock *counter += 1
        mov64_imm(R0, ALLOW),
        exit_insn(),
        label("create"),
        st_mem(W, R10, -16, 1),             # value = 1 at fp-16: this packet counted
        ld_map_fd(R1, map_fd),
        mov64_reg(R2, R10),
        alu64_imm(ADD, R2, -8),             # r2 = &key
        mov64_reg(R3, R10),
        alu64_imm(ADD, R3, -16),            # r3 = &value
        mov64_imm(R4, syscall.BPF_NOEXIST),
        call("map_update_elem"),
        jmp_imm(JEQ, R0, 0, "out"),
        # Another CPU created it first: count on the element it made.
        ld_map_fd(R1, map_fd),
        mov64_reg(R2, R10),
        alu64_imm(ADD, R2, -8),
        call("map_lookup_elem"),
        jmp_imm(JEQ, R0, 0, "out"),
        ja("bump"),
        label("out"),
        mov64_imm(R0, ALLOW),
        exit_insn(),
    ])


def sk_storage_program(map_fd: int) -> bytes:
    """counter = bpf_sk_storage_get(map, sk, &zero, F_CREATE); add 1 atomically."""
    return assemble([
        mov64_reg(R6, R1),                  # r6 = skb (ctx)
        ldx_mem(DW, R1, R6, SKB_SK),        # r1 = skb->sk: sock_common or NULL
        jmp_imm(JEQ, R1, 0, "out"),
        call("sk_fullsock"),                # the helper wants a full socket
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_reg(R2, R0),                  # r2 = sk
        st_mem(W, R10, -4, 0),              # init = 0 at fp-4
        ld_map_fd(R1, map_fd),
        mov64_reg(R3, R10),
        alu64_imm(ADD, R3, -4),             # r3 = &init
        mov64_imm(R4, syscall.BPF_SK_STORAGE_GET_F_CREATE),
        call("sk_storage_get"),             # r0 = this socket's counter or NULL
        jmp_imm(JEQ, R0, 0, "out"),
        mov64_imm(R1, 1),
        atomic_add(W, R0, R1, 0),           # lock *counter += 1
        label("out"),
        mov64_imm(R0, ALLOW),
        exit_insn(),
    ])


def socket_cookie(sock: socket.socket) -> int:
    """The socket's cookie (SO_COOKIE, 4.12+): the same value bpf_get_socket_cookie() sees."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def _u32_or_none(read: Callable[[], bytes]) -> int | None:
    try:
        return struct.unpack("=I", read())[0]
    except syscall.BpfError as err:
        if err.errno == errno.ENOENT:
            return None
        raise


@dataclass(frozen=True)
class Variant:
    """One way to keep the counter: its map, its program, and how user space reads it back."""

    name: str
    prog_name: str
    program: Callable[[int], bytes]

    def create_map(self, sockets: int) -> int:
        """A map that can hold one counter per socket."""
        if self.name == "hash":
            return maps.create_map(syscall.BPF_MAP_TYPE_HASH, 8, 4, hash_max_entries(sockets),
                                   name="bench_hash")
        return maps.create_sk_storage_map(4, name="bench_sk_stg")

    def counter(self, map_fd: int, sock: socket.socket) -> int | None:
        """The socket's counter, None when the program never created one."""
        if self.name == "hash":
            key = struct.pack("=Q", socket_cookie(sock))
            return _u32_or_none(lambda: maps.lookup_elem(map_fd, key, 4))
        return _u32_or_none(lambda: maps.lookup(map_fd, sock.fileno(), 4))


# Program names as in the commit's bpftool output (15 characters at most).
VARIANT_BY_NAME = {
    "hash": Variant("hash", "egress_sk_map", hash_program),
    "sk_storage": Variant("sk_storage", "egress_sk_stora", sk_storage_program),
}


def hash_max_entries(sockets: int) -> int:
    """The seed's 8192, or the socket count when that is larger (a full map drops counts)."""
    return max(HASH_MAX_ENTRIES, sockets)


# --- traffic and its expected counts ----------------------------------------------------

def packets_for(sockets: int, packets: int) -> int:
    """Datagrams of the measured phase: the requested number, but every socket sends once."""
    return max(packets, sockets)


def burst_schedule(sockets: int, packets: int, burst: int) -> Iterator[tuple[int, int]]:
    """(socket index, datagrams) in sending order: `burst` per socket, cycling over them."""
    index = 0
    while packets > 0:
        count = min(burst, packets)
        yield index, count
        packets -= count
        index = (index + 1) % sockets


def expected_counts(sockets: int, packets: int, burst: int = 1, warmup: int = 1) -> list[int]:
    """Per-socket datagrams after `warmup` rounds and the measured phase's schedule."""
    counts = [warmup] * sockets
    full, rest = divmod(packets, sockets * burst)
    for index in range(sockets):
        counts[index] += full * burst + min(burst, max(0, rest - index * burst))
    return counts


def counter_mismatches(expected: Sequence[int], observed: Sequence[int | None],
                       limit: int = 5) -> list[str]:
    """Human-readable differences between expected and observed counters, at most `limit`."""
    if len(expected) != len(observed):
        return [f"{len(observed)} counters read for {len(expected)} sockets"]
    wrong = [(i, e, o) for i, (e, o) in enumerate(zip(expected, observed)) if e != o]
    lines = [f"socket {i}: counter {'missing' if o is None else o}, sent {e}"
             for i, e, o in wrong[:limit]]
    if len(wrong) > limit:
        lines.append(f"... and {len(wrong) - limit} more sockets")
    return lines


@contextlib.contextmanager
def udp_senders(count: int) -> Iterator[list[socket.socket]]:
    """`count` UDP sockets connected to one loopback receiver; all closed after the block.

    The receiver is never read: once its buffer is full the stack drops datagrams on
    receive, after the egress program has run, so counting is unaffected.
    """
    owned: list[socket.socket] = []
    try:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        owned.append(receiver)
        receiver.bind(("127.0.0.1", 0))
        address = receiver.getsockname()
        senders = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            owned.append(sock)
            sock.connect(address)
            senders.append(sock)
        yield senders
    finally:
        for sock in owned:
            sock.close()


def send_bursts(senders: Sequence[socket.socket], packets: int, burst: int = 1) -> None:
    """Send `packets` datagrams following burst_schedule(); burst 1 is plain round-robin.

    Round-robin makes every packet touch a socket whose data went cold while N-1 others
    sent; longer bursts keep the socket (and its counter) hot in the CPU caches.
    """
    sends = [sock.send for sock in senders]
    if burst == 1:  # the default, kept tight: the loop is Python's cost, not the kernel's
        rounds, rest = divmod(packets, len(sends))
        for _ in range(rounds):
            for send in sends:
                send(PAYLOAD)
        for send in sends[:rest]:
            send(PAYLOAD)
        return
    for index, count in burst_schedule(len(sends), packets, burst):
        send = sends[index]
        for _ in range(count):
            send(PAYLOAD)


# --- one measurement --------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """One variant at one socket count, verified; ns_per_run covers the measured phase only."""

    variant: str
    sockets: int
    packets: int
    repeat: int
    run_time_ns: int
    run_cnt: int
    ns_per_run: float
    warmup_run_time_ns: int
    warmup_run_cnt: int
    wall_seconds: float
    xlated_bytes: int
    jited_bytes: int
    # --perf: perf_event counts over the measured phase (this process, user and kernel)
    counters: dict = field(default_factory=dict)


def _counters(info: prog.ProgInfo) -> tuple[int, int]:
    return info.run_time_ns, info.run_cnt


def measure(variant: Variant, sockets: int, packets: int, burst: int, repeat: int,
            cgroup_fd: int, perf: bool = False) -> Measurement:
    """Fresh map, program and sockets; one warm-up round creates every counter, then the
    measured phase; raises BenchmarkFailed when the counters disagree with the traffic.
    With perf, hardware counters cover the measured phase too (perf_counters)."""
    map_fd = variant.create_map(sockets)
    try:
        prog_fd = prog.load_program(syscall.BPF_PROG_TYPE_CGROUP_SKB, variant.program(map_fd),
                                    expected_attach_type=EGRESS, name=variant.prog_name)
        try:
            raw = syscall.obj_info(prog_fd, syscall.ProgInfoStruct())
            with udp_senders(sockets) as senders:
                with prog.attached(prog_fd, cgroup_fd, EGRESS):
                    send_bursts(senders, sockets)
                    start_ns, start_cnt = _counters(prog.prog_info(prog_fd))
                    started = time.monotonic()
                    with perf_counters.counting() if perf else contextlib.nullcontext() as counted:
                        send_bursts(senders, packets, burst)
                    wall = time.monotonic() - started
                    end_ns, end_cnt = _counters(prog.prog_info(prog_fd))
                observed = [variant.counter(map_fd, sock) for sock in senders]
        finally:
            os.close(prog_fd)
    finally:
        os.close(map_fd)

    problems = []
    if start_cnt != sockets:
        problems.append(f"warm-up: run_cnt {start_cnt}, datagrams sent {sockets}")
    if end_cnt - start_cnt != packets:
        problems.append(f"measured phase: run_cnt {end_cnt - start_cnt}, datagrams sent {packets}")
    expected = expected_counts(sockets, packets, burst)
    problems += counter_mismatches(expected, observed)
    total = sum(c or 0 for c in observed)
    if total != sum(expected):
        problems.append(f"counters sum to {total}, datagrams sent {sum(expected)}")
    if problems:
        raise BenchmarkFailed(
            f"{variant.name} with {sockets} sockets, repeat {repeat + 1}: counters do not match "
            "the traffic: " + "; ".join(problems)
        )
    return Measurement(
        variant=variant.name, sockets=sockets, packets=packets, repeat=repeat,
        run_time_ns=end_ns - start_ns, run_cnt=end_cnt - start_cnt,
        ns_per_run=(end_ns - start_ns) / (end_cnt - start_cnt),
        warmup_run_time_ns=start_ns, warmup_run_cnt=start_cnt, wall_seconds=round(wall, 4),
        xlated_bytes=raw.xlated_prog_len, jited_bytes=raw.jited_prog_len,
        counters=dict(counted.values) if perf else {},
    )


# --- the whole run ----------------------------------------------------------------------

def raise_fd_limit(wanted: int) -> int:
    """Lift RLIMIT_NOFILE towards `wanted` (the hard limit too, when privileged); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # not privileged, or above fs.nr_open: settle for the hard limit
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def lift_memlock_limit() -> str:
    """RLIMIT_MEMLOCK to unlimited: kernels before 5.11 charge maps to it (8192 hash entries
    overflow the usual 64 KiB and BPF_MAP_CREATE fails with EPERM). The limit in effect."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        # Without CAP_SYS_RESOURCE only the soft limit moves, up to the hard one.
        _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def socket_counts_within(counts: Sequence[int], fd_limit: int) -> tuple[list[int], list[int]]:
    """(counts this fd limit allows, counts dropped) given FD_HEADROOM spare descriptors."""
    kept = [c for c in counts if c + FD_HEADROOM <= fd_limit]
    return kept, [c for c in counts if c not in kept]


def jit_setting() -> str | None:
    """net.core.bpf_jit_enable as the kernel reports it; None without a JIT at all."""
    try:
        with open("/proc/sys/net/core/bpf_jit_enable") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def cpu_description() -> dict:
    """CPU model, count and whether the CPU says it runs under a hypervisor."""
    model, hypervisor = platform.processor() or "", False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                if key.strip() == "flags":
                    hypervisor = hypervisor or "hypervisor" in value.split()
    except OSError:
        pass
    return {"model": model, "count": os.cpu_count(), "hypervisor": hypervisor}


def point_summary(measurements: Sequence[Measurement]) -> dict:
    """Median/spread per variant and the sk-storage/hash ratio, for one socket count."""
    by_variant = {v: [m.ns_per_run for m in sorted(measurements, key=lambda m: m.repeat)
                      if m.variant == v] for v in VARIANTS}
    first = measurements[0]
    return {
        "sockets": first.sockets,
        "packets": first.packets,
        "hash_max_entries": hash_max_entries(first.sockets),
        "ns_per_run": {v: stats.summarize(values) for v, values in by_variant.items()},
        "runs": {v: sum(m.run_cnt for m in measurements if m.variant == v) for v in VARIANTS},
        "ratio_sk_storage_to_hash": stats.ratio_summary(by_variant["sk_storage"],
                                                        by_variant["hash"]),
        **({"per_run": per_run_counters(measurements)} if first.counters else {}),
    }


def per_run_counters(measurements: Sequence[Measurement]) -> dict:
    """Per variant and counter: the median over repeats of count / program runs."""
    return {v: {name: stats.summarize([m.counters[name] / m.run_cnt for m in measurements
                                       if m.variant == v])
                for name in sorted(measurements[0].counters)}
            for v in VARIANTS}


def check_can_run() -> None:
    """CannotRun with the reason when this process or kernel cannot run the benchmark."""
    if os.geteuid() != 0:
        raise CannotRun("the benchmark needs root (bpf(2), cgroup2 attach): run it as root")
    try:
        for feature in ("bpf_syscall", "btf_load", "sk_storage_map"):
            if not probes.has(feature):
                raise CannotRun(probes.missing_reason(feature))
    except syscall.BpfError as err:
        raise CannotRun(f"bpf(2) is refused here ({err}); check lockdown/LSM") from None


def run(socket_counts: Sequence[int], packets: int, repeats: int,
        progress: Callable[[str], None], burst: int = 1, perf: bool = False) -> dict:
    """Measure every (socket count, repeat, variant) and return the JSON-ready result."""
    check_can_run()
    unavailable = {}
    if perf:
        with perf_counters.counting() as probe:
            pass
        unavailable = probe.unavailable
        for name, why in unavailable.items():
            progress(f"perf: {name} unavailable here ({why})")
    fd_limit = raise_fd_limit(max(socket_counts) + FD_HEADROOM)
    memlock = lift_memlock_limit()
    counts, dropped = socket_counts_within(socket_counts, fd_limit)
    notes = []
    if dropped:
        notes.append(f"socket counts {dropped} skipped: RLIMIT_NOFILE is {fd_limit}")
    if not counts:
        raise CannotRun(f"RLIMIT_NOFILE {fd_limit} allows none of the socket counts "
                        f"{list(socket_counts)}; raise it with ulimit -n")
    measurements: list[Measurement] = []
    with prog.run_time_stats() as mechanism, cgroup.temporary_cgroup("sk-storage-bench") as group:
        cgroup_fd = group.open()
        try:
            with cgroup.joined(group):
                for sockets in counts:
                    for repeat in range(repeats):
                        # Alternate the order so a drifting machine does not favour one variant.
                        order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
                        for name in order:
                            m = measure(VARIANT_BY_NAME[name], sockets,
                                        packets_for(sockets, packets), burst, repeat,
                                        cgroup_fd, perf)
                            measurements.append(m)
                            progress(f"{sockets:>6} sockets  {name:<10} repeat {repeat + 1}/"
                                     f"{repeats}: {m.ns_per_run:7.1f} ns/run over {m.run_cnt} "
                                     f"runs (verified, {m.wall_seconds:.1f} s)")
        finally:
            os.close(cgroup_fd)
    jited = all(m.jited_bytes > 0 for m in measurements)
    uname = os.uname()
    return {
        "schema": SCHEMA,
        "benchmark": "egress_counter",
        "command": ["python3", "-m", "bench", *sys.argv[1:]],
        "kernel": {"release": uname.release, "version": uname.version, "machine": uname.machine},
        "jit": {"bpf_jit_enable": jit_setting(), "programs_jited": jited},
        "stats_mechanism": mechanism,
        "cpu": cpu_description(),
        "fd_limit": fd_limit,
        "memlock_limit": memlock,
        "config": {"socket_counts": counts, "packets": packets, "repeats": repeats,
                   "burst": burst, "payload_bytes": len(PAYLOAD),
                   "hash_max_entries": HASH_MAX_ENTRIES, "warmup_rounds": 1},
        "seed": SEED,
        "notes": notes,
        "perf": {"requested": perf, "unavailable": unavailable},
        "points": [point_summary([m for m in measurements if m.sockets == s]) for s in counts],
        "measurements": [asdict(m) for m in measurements],
    }


def parse_socket_counts(text: str) -> list[int]:
    """"4096" or "64,1024,4096" -> sorted distinct positive ints."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("socket counts must be positive")
    return counts


def build_parser() -> argparse.ArgumentParser:
    """Options; the defaults reproduce the commit's setup (4096 sockets)."""
    parser = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="Per-socket egress counter: BPF hash map keyed by socket cookie vs sk "
                    "storage; prints verified JSON (exit 1: counters wrong, 2: cannot run).")
    parser.add_argument("--sockets", type=parse_socket_counts, default=[DEFAULT_SOCKETS],
                        metavar="N[,N...]",
                        help="connected UDP sockets (default: %(default)s)")
    parser.add_argument("--sweep", action="store_true",
                        help=f"socket counts {','.join(map(str, SWEEP))} (as the fd limit allows)")
    parser.add_argument("--packets", type=int, default=DEFAULT_PACKETS, metavar="N",
                        help="datagrams per measurement, at least one per socket "
                             "(default: %(default)s)")
    parser.add_argument("--burst", type=int, default=1, metavar="K",
                        help="datagrams a socket sends before the next one takes over; 1 "
                             "(default) is round-robin, every packet on a cold socket")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEATS, metavar="N",
                        help="measurements per variant and socket count (default: %(default)s)")
    parser.add_argument("--perf", action="store_true",
                        help="also count cycles, instructions and cache misses over each "
                             "measured phase (perf_event_open; needs a PMU and root)")
    parser.add_argument("--output", metavar="FILE", help="write the JSON here, not to stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print/write JSON; one-line errors with exit 1 (failed) or 2 (cannot run)."""
    args = build_parser().parse_args(argv)
    if min(args.packets, args.repeat, args.burst) < 1:
        print("bench: cannot run: --packets, --repeat and --burst must be at least 1",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    counts = list(SWEEP) if args.sweep else args.sockets

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        result = run(counts, args.packets, args.repeat, progress, args.burst, args.perf)
    except CannotRun as err:
        print(f"bench: cannot run: {err}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except BenchmarkFailed as err:
        print(f"bench: FAILED: {err}", file=sys.stderr)
        return EXIT_FAILED
    except syscall.BpfError as err:
        print(f"bench: FAILED: {err}", file=sys.stderr)
        return EXIT_FAILED
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        sys.stdout.write(text)
    return EXIT_OK

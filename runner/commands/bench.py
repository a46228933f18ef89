"""`run-selftests bench`: the sk storage commit's benchmark, on a booted kernel or on this host.

The measuring is done by the guest-side module selftests/bench (stdlib + bpfkit), exactly
the same way everywhere: in the guest booted like a normal run, or with --host directly on
this machine's kernel.  It writes verified JSON; this module only brings it back, adds
the accelerator, and renders the table (and, for --sweep, a PNG when matplotlib is there).
`--from-json FILE` re-renders a saved result, e.g. one produced on an SSH target with
`cd selftests && python3 -m bench --output FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from runner import preflight, record
from runner.cache import open_cache
from runner.commands import option_groups, pipeline
from runner.errors import ExitCode, InfrastructureError, RunnerError, UsageError
from runner.stages import accel, artifacts, results

BENCH_JSON = "bench.json"
BENCH_EXIT_FILE = "bench-exitcode"
# The benchmark as the one "test" of its guest run, for the shared verdict.
BENCH_TEST = "bench::egress_counter"
SWEEP_PNG = "bench-sweep.png"
# The guest module's exit codes (selftests/bench/egress_counter.py).
BENCH_OK, BENCH_FAILED, BENCH_CANNOT_RUN = 0, 1, 2
VARIANT_LABELS = {"hash": "hash map (socket cookie)", "sk_storage": "sk storage"}
# The commit keyed its hash map by the sk pointer (with a patched verifier), under netperf.
SEED_LABELS = {"hash": "hash map, sk pointer key", "sk_storage": "sk storage"}


class BenchFailed(RunnerError):
    """The benchmark ran but its counters did not match the traffic: no numbers."""

    exit_code = ExitCode.TEST_FAILURE


# --- arguments ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The kernel/boot options of a normal run plus the benchmark's own."""
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--host", action="store_true",
                       help="measure this machine's own kernel (needs root), no guest")
    bench.add_argument("--sweep", action="store_true",
                       help="socket counts 64..16384 (as the fd limit allows) and a PNG plot")
    bench.add_argument("--repeat", type=int, default=5, metavar="N",
                       help="measurements per variant and socket count (default: %(default)s)")
    bench.add_argument("--sockets", default="4096", metavar="N[,N...]",
                       help="connected UDP sockets (default: %(default)s, as in the commit)")
    bench.add_argument("--packets", type=int, default=200_000, metavar="N",
                       help="datagrams per measurement (default: %(default)s)")
    bench.add_argument("--burst", type=int, default=1, metavar="K",
                       help="datagrams per socket in a row; 1 (default) is round-robin, "
                            "every packet on a cache-cold socket")
    bench.add_argument("--perf", action="store_true",
                       help="count cycles, instructions and cache misses per program run "
                            "(perf_event_open around each measured phase; needs a PMU: a "
                            "native --host run, or a KVM guest with a virtual PMU)")
    bench.add_argument("--from-json", type=Path, metavar="FILE",
                       help="only render a saved bench.json, run nothing")
    # No --shell (the guest runs the benchmark) and no -k (the benchmark is its one test).
    option_groups.add_tree_options(parser)
    option_groups.add_build_options(parser)
    option_groups.add_prebuilt_options(parser)
    option_groups.add_guest_options(parser)
    option_groups.add_test_options(parser, keyword=False)
    option_groups.add_file_options(parser)


def guest_module_args(args: argparse.Namespace) -> list[str]:
    """The `python3 -m bench` options these arguments ask for."""
    if min(args.repeat, args.packets, args.burst) < 1:
        raise UsageError("--repeat, --packets and --burst must be at least 1")
    module_args = ["--repeat", str(args.repeat), "--packets", str(args.packets),
                   "--burst", str(args.burst)]
    module_args += ["--perf"] if args.perf else []
    return module_args + (["--sweep"] if args.sweep else ["--sockets", args.sockets])


def guest_bench_command(python: str, suite_dir: Path, output_dir: Path,
                        module_args: Sequence[str]) -> str:
    """The shell command the guest runs: the bench module, JSON and exit code into output_dir."""
    out = shlex.quote(str(output_dir))
    command = [python, "-m", "bench", *module_args, "--output", str(output_dir / BENCH_JSON)]
    return (
        f"cd {shlex.quote(str(suite_dir))}; export PYTHONDONTWRITEBYTECODE=1; "
        f"uname -r > {out}/{artifacts.GUEST_RELEASE_FILE}; "
        f"{shlex.join(command)}; echo $? > {out}/{BENCH_EXIT_FILE}"
    )


# --- running ------------------------------------------------------------------------------

def run_on_host(suite_dir: Path, out: Path, module_args: Sequence[str],
                log: Callable[[str], None]) -> tuple[int, str]:
    """Run the bench module on this kernel; (exit code, its last error line)."""
    if os.geteuid() != 0:
        raise UsageError("bench --host measures this machine's kernel and needs root "
                         "(bpf(2), cgroup attach); rerun as root")
    command = [sys.executable, "-m", "bench", *module_args, "--output", str(out / BENCH_JSON)]
    log(f"bench: $ cd {suite_dir} && {shlex.join(command)}")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(command, cwd=suite_dir, env=env, stderr=subprocess.PIPE, text=True)
    last_error = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        line = line.rstrip("\n")
        log(line)
        if line.startswith("bench: "):
            last_error = line
    return proc.wait(), last_error


def run_in_guest(options: pipeline.RunOptions, out: Path, module_args: Sequence[str],
                 summary: record.RunRecord, log: Callable[[str], None]) -> results.Verdict:
    """Obtain and boot the kernel like a normal run with the bench as the guest command."""
    cache = open_cache(options.cache_dir)
    provider = pipeline.kernel_provider(options, cache)
    preflight.check(pipeline.requirements(provider))
    kernel = pipeline.obtain_kernel(provider, out, pipeline.run_timings(summary), summary, log)
    plan = accel.plan_for_host(options.accel, cache.kvm_verdict)
    log(f"boot: {plan.reason}")
    command = guest_bench_command(sys.executable, Path(options.suite).resolve(), out,
                                  module_args)
    target = pipeline.VmTarget(kernel, command, plan, options, cache)
    status, declared_release = target.run(out, summary, log)
    pipeline.kernel_facts(summary)["release"] = pipeline.kernel_release(out, declared_release)
    return judge_guest_run(out, status)


def judge_guest_run(out: Path, boot_status: str) -> results.Verdict:
    """The verdict of a benchmark guest, by the same judge() as a test run.

    The benchmark counts as one test: passed with its verified JSON, failed with
    its error line; when it left neither, judge() decides between a guest that
    never started it (infrastructure) and one that died (crash).
    """
    console = pipeline.read_console(out)
    splats = results.find_console_splats(console)
    code = results.read_exit_code(out / BENCH_EXIT_FILE)
    errors = [line.strip() for line in console.splitlines() if line.strip().startswith("bench: ")]
    error_line = errors[-1].removeprefix("bench: ") if errors else ""
    tests: list[results.TestResult] | None = None
    problem = None
    if code == BENCH_OK and (out / BENCH_JSON).is_file():
        tests = [results.TestResult(BENCH_TEST, "passed", "", 0.0)]
    elif code in (BENCH_FAILED, BENCH_CANNOT_RUN) and error_line:
        # In a guest the runner booted, "cannot run" is as much a failure as wrong counters.
        tests = [results.TestResult(BENCH_TEST, "failed", error_line, 0.0)]
    elif code is None:
        problem = f"no {BENCH_EXIT_FILE}"
    else:
        problem = f"the benchmark exited {code} without a result or an error line"
    pytest_like_exit = None if tests is None else (
        results.PYTEST_OK if tests[0].outcome == "passed" else results.PYTEST_TESTS_FAILED)
    return results.judge(boot_status, pytest_like_exit, tests, splats, problem,
                         target=results.TARGET_VM, console=console)


def check_exit(code: int | None, error_line: str, out: Path) -> None:
    """Turn the bench module's exit code into a one-line error, or return when it succeeded."""
    if code == BENCH_OK and (out / BENCH_JSON).is_file():
        return
    why = error_line.removeprefix("bench: ") if error_line else "no error line; see the log"
    if code == BENCH_FAILED:
        raise BenchFailed(f"benchmark failed, no numbers reported: {why}")
    if code == BENCH_CANNOT_RUN:
        raise UsageError(f"the benchmark could not run: {why}")
    if code is None:
        raise InfrastructureError(f"the benchmark left no exit code in {out}; the guest died?")
    raise InfrastructureError(f"the benchmark exited {code} ({why}); see {out}")


# --- rendering ----------------------------------------------------------------------------

def jit_label(result: dict) -> str:
    """"on" only when the programs really were JIT-compiled; else what the kernel said."""
    jit = result.get("jit", {})
    setting = jit.get("bpf_jit_enable")
    if setting is None:
        return "off (no JIT in this kernel)"
    if jit.get("programs_jited") and setting != "0":
        return f"on (bpf_jit_enable={setting})"
    return f"off (bpf_jit_enable={setting}, programs interpreted)"


def accel_label(result: dict) -> str:
    """Where the kernel ran: the accelerator of the guest, or the host itself."""
    where = result.get("accel")
    if where:
        return where
    if result.get("cpu", {}).get("hypervisor"):
        return "unknown (the CPU reports a hypervisor)"
    return "unknown"


def header(result: dict) -> list[str]:
    """Kernel, JIT, accelerator and workload: the lines above every table."""
    config = result["config"]
    cpu = result.get("cpu", {})
    kernel = (f"kernel {result['kernel']['release']} ({result['kernel']['machine']}), "
              f"JIT {jit_label(result)}, accelerator: {accel_label(result)}")
    burst = config.get("burst", 1)
    order = "round-robin" if burst == 1 else f"bursts of {burst} per socket"
    workload = (f"cpu: {cpu.get('model', '?')} x{cpu.get('count', '?')}; stats via "
                f"{result.get('stats_mechanism', '?')}; {config['packets']} datagrams per "
                f"measurement ({order}) after one warm-up round, {config['repeats']} "
                "repeats, median [min-max]")
    return [kernel, workload]


def _ns(summary: dict) -> str:
    return f"{summary['median']:.1f} [{summary['min']:.1f}-{summary['max']:.1f}]"


def _ratio(ratio: dict) -> str:
    return (f"{ratio['of_medians']:.2f} [paired {ratio['paired_min']:.2f}-"
            f"{ratio['paired_max']:.2f}]")


def point_table(result: dict, point: dict) -> str:
    """Markdown: variant | ns per run | runs | ratio, then the seed's numbers for comparison."""
    seed = result["seed"]
    rows = [
        "| variant | ns per run | runs | ratio sk-storage/hash |",
        "|---|---:|---:|---:|",
    ]
    for variant in ("hash", "sk_storage"):
        ratio = _ratio(point["ratio_sk_storage_to_hash"]) if variant == "sk_storage" else ""
        rows.append(f"| {VARIANT_LABELS[variant]} | {_ns(point['ns_per_run'][variant])} | "
                    f"{point['runs'][variant]:,} | {ratio} |")
    seed_ns = seed["ns_per_run"]
    for variant in ("hash", "sk_storage"):
        ratio = f"{seed_ns['sk_storage'] / seed_ns['hash']:.2f}" if variant == "sk_storage" else ""
        rows.append(f"| seed {seed['commit']} ({SEED_LABELS[variant]}) | "
                    f"{seed_ns[variant]} | | {ratio} |")
    return "\n".join(rows)


def sweep_table(result: dict) -> str:
    """Markdown: one row per socket count with both variants and the ratio."""
    rows = [
        "| sockets | hash map ns per run | sk storage ns per run | ratio sk-storage/hash |",
        "|---:|---:|---:|---:|",
    ]
    for point in result["points"]:
        ns = point["ns_per_run"]
        rows.append(f"| {point['sockets']} | {_ns(ns['hash'])} | {_ns(ns['sk_storage'])} | "
                    f"{_ratio(point['ratio_sk_storage_to_hash'])} |")
    return "\n".join(rows)


def render(result: dict) -> str:
    """The whole report: header, then a table per socket count (or the sweep table)."""
    lines = header(result)
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    lines.append("")
    points = result["points"]
    if len(points) > 1:
        lines.append(sweep_table(result))
        lines.append("")
    for point in points:
        if len(points) == 1 or point["sockets"] == result["seed"]["sockets"]:
            lines.append(f"{point['sockets']} sockets, {point['packets']} datagrams per "
                         f"measurement, hash max_entries {point['hash_max_entries']}:")
            lines.append(point_table(result, point))
            if "per_run" in point:
                lines += ["", counters_table(point)]
    perf = result.get("perf", {})
    for name, why in perf.get("unavailable", {}).items():
        lines.append(f"perf: {name} not counted here: {why}")
    return "\n".join(lines)


def counters_table(point: dict) -> str:
    """Markdown: each perf counter per program run (median over repeats), both variants."""
    per_run = point["per_run"]
    names = sorted(per_run["hash"])
    rows = ["| counter per run | " + " | ".join(VARIANT_LABELS[v] for v in ("hash", "sk_storage"))
            + " |", "|---|---:|---:|"]
    for name in names:
        rows.append(f"| {name} | {per_run['hash'][name]['median']:,.1f} | "
                    f"{per_run['sk_storage'][name]['median']:,.1f} |")
    return "\n".join(rows)


def plot_sweep(result: dict, path: Path) -> Path | None:
    """A PNG of ns per run against socket count; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return None
    points = result["points"]
    sockets = [p["sockets"] for p in points]
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for variant, marker in (("hash", "o"), ("sk_storage", "s")):
        summaries = [p["ns_per_run"][variant] for p in points]
        medians = [s["median"] for s in summaries]
        low = [s["median"] - s["min"] for s in summaries]
        high = [s["max"] - s["median"] for s in summaries]
        axes.errorbar(sockets, medians, yerr=[low, high], marker=marker, capsize=3,
                      label=f"{VARIANT_LABELS[variant]} (median, min-max)")
    seed = result["seed"]
    for variant, marker in (("hash", "x"), ("sk_storage", "+")):
        axes.plot([seed["sockets"]], [seed["ns_per_run"][variant]], marker, markersize=10,
                  color="black", label=f"seed {seed['commit']}: {SEED_LABELS[variant]}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sockets)
    axes.set_xticklabels([str(s) for s in sockets], rotation=45)
    burst = result["config"].get("burst", 1)
    axes.set_xlabel("connected UDP sockets (" + ("round-robin)" if burst == 1
                                                 else f"bursts of {burst})"))
    axes.set_ylabel("ns per program run")
    axes.set_ylim(bottom=0)
    axes.set_title(f"egress counter, {result['kernel']['release']}, "
                   f"JIT {jit_label(result).split()[0]}, "
                   f"accel: {accel_label(result).split(':')[0]}", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def report(result: dict, out: Path | None, log: Callable[[str], None]) -> None:
    """Print the tables; with more than one socket count also write the PNG when possible."""
    log("")
    log(render(result))
    if len(result["points"]) > 1 and out is not None:
        png = plot_sweep(result, out / SWEEP_PNG)
        log(f"plot: {png}" if png else
            "plot: matplotlib is not installed (pip install 'sk-storage-selftests[plot]'); "
            "table only")


# --- entry point --------------------------------------------------------------------------

def _validate(args: argparse.Namespace) -> None:
    kernel_options = [name for name, value in (("--kernel-src", args.kernel_src),
                                               ("--kernel-image", args.kernel_image),
                                               ("--distro-kernel", args.distro_kernel))
                      if value]
    if args.host and kernel_options:
        raise UsageError(f"--host measures the running kernel; drop {', '.join(kernel_options)}")


def main(args: argparse.Namespace, argv: Sequence[str] | None = None,
         log: Callable[[str], None] = print) -> int:
    """Run the benchmark (host or guest), then print its tables; exit code per ExitCode."""
    if args.from_json is not None:
        try:
            result = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--from-json {args.from_json}: {exc}") from None
        report(result, Path(args.from_json).parent, log)
        return int(ExitCode.PASS)
    _validate(args)
    module_args = guest_module_args(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    options = option_groups.options_from_args(args, argv)
    if not args.host:
        pipeline.validate(options)
        preflight.check_guest_visible(pipeline.guest_paths(options))
    out = artifacts.prepare_output_dir(options.output)
    for stale in (BENCH_JSON, BENCH_EXIT_FILE, SWEEP_PNG):
        (out / stale).unlink(missing_ok=True)
    log(f"output: {out}")
    started = time.monotonic()
    summary = record.RunRecord(
        command=["run-selftests", *argv],
        reproducer=f"cd {Path.cwd()} && " + artifacts.reproducer(argv, out),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        kernel={}, timings={}, bench_args=list(module_args),
        target_kind=None if args.host else results.TARGET_VM,
    )
    try:
        if args.host:
            code, error_line = run_on_host(Path(options.suite).resolve(), out, module_args, log)
            check_exit(code, error_line, out)
            where = "none: the host's own kernel"
        else:
            verdict = run_in_guest(options, out, module_args, summary, log)
            summary.verdict, summary.reason = verdict.label, verdict.reason
            summary.exit_code = int(verdict.exit_code)
            if verdict.exit_code != ExitCode.PASS:
                splats = results.find_console_splats(pipeline.read_console(out))
                if splats:
                    log(results.format_splats(splats))
                log(results.verdict_line(verdict))
                return int(verdict.exit_code)
            assert summary.accel is not None  # boot_and_record always records it
            where = summary.accel.used
        result = json.loads((out / BENCH_JSON).read_text())
        if args.host and result.get("cpu", {}).get("hypervisor"):
            where += " (this machine is itself a VM)"
        result["accel"] = where
        (out / BENCH_JSON).write_text(json.dumps(result, indent=2) + "\n")
        summary.verdict, summary.exit_code = results.VerdictLabel.PASS, int(ExitCode.PASS)
        summary.accel_label, summary.kernel_release = where, result["kernel"]["release"]
        report(result, out, log)
        return int(ExitCode.PASS)
    except BaseException as error:  # noqa: BLE001 - recorded, then raised again
        raise pipeline.record_early_end(error, out, summary, log)
    finally:
        pipeline.run_timings(summary)["total"] = round(time.monotonic() - started, 2)
        summary.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record.write(out, summary)
        log(f"artifacts: {out}")

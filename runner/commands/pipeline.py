"""The `run` command, top to bottom: source -> series -> config -> build -> boot -> results.

Each stage is a call into its own module with plain values in and out; this
file only sequences them, times them, and keeps the artifacts and
summary.json complete even when a stage fails.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from runner import preflight, progress, record
from runner.cache import Cache, open_cache
from runner.errors import ExitCode, Interrupted, RunnerError, UsageError, machine_state_error
from runner.stages import (
    accel,
    artifacts,
    boot,
    build,
    debug_kernel,
    guest_bundle,
    kconfig,
    patches,
    prebuilt,
    results,
    source,
)
from runner.targets import keep, remote

REPO_ROOT = Path(__file__).resolve().parents[2]  # runner/<package>/<module>.py
DEFAULT_SUITE = REPO_ROOT / "selftests"
DEFAULT_SERIES = REPO_ROOT / "kernel_patches" / "series"
DEFAULT_FRAGMENTS = (REPO_ROOT / "kconfig" / "sk-storage.config",)
DEFAULT_MARKERS = "not stress"
# Where a run keeps the traceback of an exception that escaped the runner (a bug).
RUNNER_TRACEBACK = "runner-traceback.txt"
# The full log of one run of a command made of many (matrix, regressions): see run_recorded.
RUN_LOG = "runner.log"


@dataclass
class RunOptions:
    """Everything `run-selftests` was asked to do, as plain values."""

    kernel_src: Path | None = None
    base: str | None = None
    series: Path | None = None
    force: bool = False
    config: list[Path] = field(default_factory=list)
    kernel_image: Path | None = None
    modules: Path | None = None
    distro_kernel: str | None = None
    jobs: int = os.cpu_count() or 1
    accel: str = "auto"
    cpus: int = 2
    memory: str = "2G"
    timeout: float = 1800.0
    stall_timeout: float = 300.0
    output: Path | None = None
    cache_dir: Path | None = None
    keyword: str | None = None
    markers: str | None = DEFAULT_MARKERS
    suite: Path = DEFAULT_SUITE
    shell: bool = False
    verbose: bool = False
    debug_kernel: bool = False
    argv: Sequence[str] = ()
    target: remote.RemoteOptions | None = None
    keep: bool = False
    stop: bool = False
    # pytest --exitfirst: the mutation sweep needs one failing test, not all of them.
    exitfirst: bool = False


@dataclass
class KernelToBoot:
    """The kernel the boot stage gets, whichever way it was obtained."""

    image: Path
    origin: str
    release: str | None = None
    details: dict = field(default_factory=dict)


def validate(options: RunOptions) -> None:
    """Option combinations that cannot work, refused before anything starts."""
    sources = [n for n, v in (("--kernel-src", options.kernel_src),
                              ("--kernel-image", options.kernel_image),
                              ("--distro-kernel", options.distro_kernel)) if v]
    if len(sources) > 1:
        raise UsageError(f"{' and '.join(sources)} exclude each other; pick one kernel")
    prebuilt_kernel = options.kernel_image or options.distro_kernel
    if options.modules and not options.kernel_image:
        raise UsageError("--modules goes with --kernel-image")
    if prebuilt_kernel and (options.series or options.base or options.config
                            or options.debug_kernel):
        raise UsageError("--series, --base, --config and --debug-kernel need a kernel to "
                         "build; they do not apply to --kernel-image/--distro-kernel")
    if options.base and not options.kernel_src:
        raise UsageError("--base REV needs --kernel-src pointing at a git tree")
    for name, count in (("--cpus", options.cpus), ("--jobs", options.jobs)):
        if count < 1:
            raise UsageError(f"{name} must be at least 1")
    for name, seconds in (("--timeout", options.timeout),
                          ("--stall-timeout", options.stall_timeout)):
        if seconds <= 0:
            raise UsageError(f"{name} must be positive")
    if not options.shell and not Path(options.suite).is_dir():
        raise UsageError(f"test suite directory {options.suite} does not exist; check --suite")
    if options.target:
        local = [n for n, v in (("--kernel-src", options.kernel_src),
                                ("--kernel-image", options.kernel_image),
                                ("--distro-kernel", options.distro_kernel),
                                ("--series", options.series), ("--config", options.config),
                                ("--shell", options.shell), ("--keep", options.keep)) if v]
        if local:
            raise UsageError(f"--target tests the kernel the target runs; drop "
                             f"{', '.join(local)}")
    if options.keep and options.shell:
        raise UsageError("--keep and --shell exclude each other; pick one")


def guest_paths(options: RunOptions) -> list[preflight.GuestPath]:
    """What the guest must see of the host: the suite, the interpreter and its venv, the output."""
    elsewhere = "(e.g. under /srv, /tmp or your home directory)"
    install = f"clone and install the project elsewhere {elsewhere} and run its .venv"
    if options.output is not None:
        output = preflight.GuestPath("--output", Path(options.output),
                                     f"pass an --output directory elsewhere {elsewhere}")
    else:
        output = preflight.GuestPath("the default output directory", Path.cwd() / "runs",
                                     f"run from another directory or pass --output {elsewhere}")
    return [preflight.GuestPath("the suite (--suite)", Path(options.suite),
                                f"move it or the checkout elsewhere {elsewhere}"),
            preflight.GuestPath("the Python interpreter", Path(sys.executable), install),
            preflight.GuestPath("the Python environment", Path(sys.prefix), install),
            output]


def build_from_source(
    options: RunOptions, user_source: source.KernelSource | None, cache: Cache, out: Path,
    timings: dict, summary: record.RunRecord, log: Callable[[str], None],
) -> KernelToBoot:
    """Stages 1-4: source, series, config and build; the tree is restored before returning."""
    started = time.monotonic()
    src = user_source or source.ensure_default_source(cache, log=log)
    if options.base:
        src = source.checkout_base(src, options.base, cache)
    log(f"source: {src.origin} (Linux {src.version})")
    series_file = options.series or (DEFAULT_SERIES if user_source is None else None)
    if series_file is not None and options.series is None and not Path(series_file).exists():
        raise UsageError(f"the default series {series_file} is missing from this checkout")
    series = patches.load_series(series_file) if series_file else None
    fragments = [kconfig.load_fragment(p) for p in (
        *DEFAULT_FRAGMENTS, *debug_kernel.fragments(options.debug_kernel), *options.config)]
    build_dir = build.build_dir_for(cache, src.path, series, [f.path for f in fragments])
    kernel_facts(summary).update(source=src.origin, source_path=str(src.path),
                             source_version=src.version, source_revision=src.revision,
                             build_dir=str(build_dir.root),
                             fragments=[str(f.path) for f in fragments])
    timings["source"] = round(time.monotonic() - started, 2)

    journal = patches.journal_dir_for(cache.root, src.path)
    started = time.monotonic()
    # Which logs belong to this run: a build directory keeps the previous run's.
    reached = set()
    try:
        with patches.series_applied(src, series, journal, force=options.force,
                                    log=log) as applied:
            paths = {e.name: e.path for e in series.entries} if series else {}
            summary.series = {
                "file": str(series.file) if series else None,
                "entries": [{"name": e.name, "method": e.method, "files": e.files,
                             "commit": e.commit,
                             "path": str(paths[e.name]) if paths.get(e.name) else None}
                            for e in applied.entries],
            }
            reused = patches.reuse_built_mtimes(src.path, applied.touched,
                                                build_dir.patched_files_state)
            if reused:
                log(f"patches: {len(reused)} patched file(s) unchanged since the last build")
            timings["patches"] = round(time.monotonic() - started, 2)

            started = time.monotonic()
            reached.add("config")
            config = kconfig.configure(src.path, build_dir.obj, build_dir.config_work,
                                       fragments, build_dir.config_log)
            state = ("regenerated, changed" if config.rewritten else
                     "regenerated, unchanged" if config.regenerated else "inputs unchanged, kept")
            log(f"config: {state}; every requested option survived olddefconfig")
            timings["config"] = round(time.monotonic() - started, 2)

            started = time.monotonic()
            values = kconfig.parse_config(config.path.read_text())
            targets = build.build_targets(kconfig.config_needs_modules(values))
            log(f"build: make {' '.join(targets)} -j{options.jobs} in {build_dir.obj}")
            reached.add("build")
            built = build.build_kernel(src.path, build_dir, options.jobs, targets, cache)
            patches.remember_built_mtimes(src.path, applied.touched,
                                          build_dir.patched_files_state)
            timings["build"] = round(built.seconds, 2)
            summary.build = {"command": built.command, "steps": built.steps,
                                "targets": targets, "make_skipped": built.skipped}
            # Still under the tree lock: once it is released, another run of the same
            # source may rebuild the build directory's image before this one boots.
            image = out / artifacts.BOOTED_IMAGE
            shutil.copyfile(built.image, image)
    finally:
        if "config" in reached:
            artifacts.save_copy(build_dir.config_log, out, artifacts.CONFIG_LOG)
            artifacts.save_copy(build_dir.obj / ".config", out, artifacts.KERNEL_CONFIG)
        if "build" in reached:
            artifacts.save_copy(build_dir.build_log, out, artifacts.BUILD_LOG)
        if series is not None:
            artifacts.save_series(out, series.file, (summary.series or {}).get("entries", []))
    return KernelToBoot(image, f"built from {src.origin}",
                        details={"build_dir": str(build_dir.root)})


# --- where the kernel comes from, and where the suite runs ---------------------------------


class KernelProvider(Protocol):
    """Where the kernel under test comes from (tuxmake's runtimes, kunit's operations)."""

    def tools(self) -> list[preflight.Requirement]:
        """Host tools obtaining this kernel needs, besides those every boot needs."""
        ...

    def obtain(self, out: Path, timings: dict, summary: record.RunRecord,
               log: Callable[[str], None]) -> KernelToBoot:
        """Build or fetch the kernel; timings and summary say what that took."""
        ...


@dataclass
class SourceBuild:
    """The default source or --kernel-src [--base], built here (also as --debug-kernel)."""

    options: RunOptions
    user_source: source.KernelSource | None
    cache: Cache

    def tools(self) -> list[preflight.Requirement]:
        needed = list(preflight.BUILD_TOOLS)
        if self.user_source is None:
            needed += preflight.PLAIN_TREE_TOOLS
            if source.read_stamp(self.cache) is None:
                needed += preflight.DEBIAN_ARCHIVE_TOOLS
        elif self.user_source.is_git:
            needed += preflight.GIT_TOOLS
        else:
            needed += preflight.PLAIN_TREE_TOOLS
        return needed

    def obtain(self, out: Path, timings: dict, summary: record.RunRecord,
               log: Callable[[str], None]) -> KernelToBoot:
        return build_from_source(self.options, self.user_source, self.cache, out, timings,
                                 summary, log)


@dataclass
class KernelImage:
    """--kernel-image PATH [--modules DIR]: booted as it is."""

    image: prebuilt.PrebuiltKernel

    def tools(self) -> list[preflight.Requirement]:
        return []

    def obtain(self, out: Path, timings: dict, summary: record.RunRecord,
               log: Callable[[str], None]) -> KernelToBoot:
        return _prebuilt_kernel(self.image, log)


@dataclass
class DistroKernel:
    """--distro-kernel VERSION: Debian's linux-image package, fetched into the cache."""

    version: str
    cache: Cache

    def tools(self) -> list[preflight.Requirement]:
        return list(preflight.DISTRO_KERNEL_TOOLS)

    def obtain(self, out: Path, timings: dict, summary: record.RunRecord,
               log: Callable[[str], None]) -> KernelToBoot:
        started = time.monotonic()
        kernel = prebuilt.fetch_distro_kernel(self.version, self.cache, log=log)
        timings["fetch"] = round(time.monotonic() - started, 2)
        return _prebuilt_kernel(kernel, log)


def _prebuilt_kernel(kernel: prebuilt.PrebuiltKernel, log: Callable[[str], None]) -> KernelToBoot:
    log(f"kernel: {kernel.origin}")
    return KernelToBoot(kernel.image, kernel.origin, kernel.release,
                        {"modules_dir": str(kernel.modules_dir) if kernel.modules_dir else None})


def kernel_provider(options: RunOptions, cache: Cache) -> KernelProvider:
    """The provider the options name; its inputs are checked now, before any output exists."""
    if options.kernel_image:
        return KernelImage(prebuilt.open_kernel_image(options.kernel_image, options.modules,
                                                      cache))
    if options.distro_kernel:
        return DistroKernel(options.distro_kernel, cache)
    user_source = source.open_user_source(options.kernel_src) if options.kernel_src else None
    return SourceBuild(options, user_source, cache)


def requirements(provider: KernelProvider) -> list[preflight.Requirement]:
    """Every tool a run on this kernel will need, so preflight can report all at once."""
    return [*preflight.BOOT_TOOLS, *provider.tools()]


def obtain_kernel(provider: KernelProvider, out: Path, timings: dict,
                  summary: record.RunRecord, log: Callable[[str], None]) -> KernelToBoot:
    """The kernel from its provider, with what it is recorded in summary."""
    kernel = provider.obtain(out, timings, summary, log)
    kernel_facts(summary).update(image=str(kernel.image), origin=kernel.origin,
                                 release=kernel.release, **kernel.details)
    return kernel


class Target(Protocol):
    """Where the suite runs: a VM booted here, or a machine over SSH (a kept guest is one)."""

    # results.TARGET_VM or TARGET_SSH: which skips the verdict accepts.
    kind: str

    def run(self, out: Path, summary: record.RunRecord,
            log: Callable[[str], None]) -> tuple[str, str | None]:
        """Run the suite into out; (how the run ended, the kernel release it declared)."""
        ...


@dataclass
class VmTarget:
    """A guest booted on this host with `command` as its job (the suite, or the benchmark)."""

    kernel: KernelToBoot
    command: str
    plan: accel.AccelPlan
    options: RunOptions
    cache: Cache
    kind: str = results.TARGET_VM

    def run(self, out: Path, summary: record.RunRecord,
            log: Callable[[str], None]) -> tuple[str, str | None]:
        outcome = boot_and_record(self.kernel, out, self.command, self.plan, self.options,
                                  self.cache, summary, log)
        return outcome.status, self.kernel.release


@dataclass
class SshTarget:
    """--target: a machine over SSH, running its own kernel; a --keep guest is reached so too."""

    options: RunOptions
    cache: Cache
    kind: str = results.TARGET_SSH

    def run(self, out: Path, summary: record.RunRecord,
            log: Callable[[str], None]) -> tuple[str, str | None]:
        return run_on_target(self.options, self.cache, out, run_timings(summary), summary, log)


def known_bug_backports(series_summary: dict | None) -> list[str]:
    """Known-bug fixes (selftests/expectations/known_bugs.json) that an applied patch names.

    The built kernel carries them, so the suite must expect their tests to pass
    (kernel_patches/0002 carries b5c111f4967b into the default 6.1 kernel).
    """
    from bpfkit import known_bugs

    texts = [Path(entry["path"]).read_text(encoding="utf-8", errors="replace")
             for entry in (series_summary or {}).get("entries", []) if entry.get("path")]
    return sorted(known_bugs.fixes_named_in(texts, known_bugs.load_registry()))


def boot_and_record(kernel: KernelToBoot, out: Path, command: str, plan: accel.AccelPlan,
                    options: RunOptions, cache: Cache, summary: record.RunRecord,
                    log: Callable[[str], None]) -> boot.BootOutcome:
    """Boot `kernel` with `command` as the guest's job; record accel, boot and timings in summary.

    Shared by a plain run and the benchmark, so both remember a broken KVM the same way.
    """
    outcome = boot.run_guest(
        kernel.image, out, command, plan, out / artifacts.CONSOLE_LOG, cpus=options.cpus,
        memory=options.memory, timeout=options.timeout, stall_timeout=options.stall_timeout,
        echo=log, verbose=options.verbose, rw_dirs=[cache.guest_pycache],
    )
    timings = run_timings(summary)
    timings["guest"] = round(outcome.seconds, 2)
    if outcome.banner_seconds is not None:
        timings["kernel_banner"] = round(outcome.banner_seconds, 2)
    summary.accel = record.AccelRecord(outcome.accel, outcome.accel_reason,
                                       list(outcome.attempts))
    memo = accel.remember_boot(cache.kvm_verdict, outcome.accel, outcome.kvm_failure,
                               outcome.banner_seconds is not None, outcome.kvm_failed_at)
    if memo:
        log(f"boot: {memo}")
        summary.accel.kvm_memo = memo
    summary.boot = record.BootRecord(results.BootStatus(outcome.status), outcome.detail,
                                     outcome.command, outcome.exit_status)
    log(f"boot: guest finished ({outcome.detail}) under {outcome.accel} in "
        f"{outcome.seconds:.0f} s")
    return outcome


def read_console(out: Path) -> str:
    """console.log without the pty's carriage returns ("" when absent)."""
    console = out / artifacts.CONSOLE_LOG
    if not console.exists():
        return ""
    # A pty turns each newline into CR LF (or CR CR LF).  Read without newline
    # translation and drop the CRs: excerpts get no blank lines and line
    # numbers stay those of console.log.
    with open(console, encoding="utf-8", errors="replace", newline="") as stream:
        return stream.read().replace("\r", "")


def judge_output_dir(out: Path, boot_status: str, target: str = results.TARGET_VM) -> tuple:
    """Stage 6 on saved files: (verdict, tests, splats, pytest exit) from junit.xml, exit file,
    console.log; target ("vm" or "ssh") decides which skips are acceptable."""
    text = read_console(out)
    splats = results.find_console_splats(text)
    tests, problem = None, None
    try:
        tests = results.parse_junit(out / artifacts.JUNIT_FILE)
    except FileNotFoundError:
        problem = f"no {artifacts.JUNIT_FILE}"
    except ValueError as exc:
        problem = str(exc)
    pytest_exit = results.read_exit_code(out / artifacts.PYTEST_EXIT_FILE)
    verdict = results.judge(boot_status, pytest_exit, tests, splats, problem, target=target,
                            console=text)
    return verdict, tests, splats, pytest_exit


def target_kind(summary: record.RunRecord | None) -> str:
    """"ssh" or "vm" as a saved summary.json records it; older summaries: "target" means SSH."""
    if summary is None:
        return results.TARGET_VM
    if summary.target_kind in results.TARGETS:
        return summary.target_kind
    return results.TARGET_SSH if summary.target else results.TARGET_VM


def kernel_facts(summary: record.RunRecord) -> dict:
    """The record's kernel section, created empty on first use."""
    if summary.kernel is None:
        summary.kernel = {}
    return summary.kernel


def run_timings(summary: record.RunRecord) -> dict:
    """The record's timings, created empty on first use."""
    if summary.timings is None:
        summary.timings = {}
    return summary.timings


def record_verdict(summary: record.RunRecord, verdict: results.Verdict, tests, splats,
                   pytest_exit: int | None) -> None:
    """Counts per outcome, skip reasons, splats and the verdict into the run record."""
    summary.pytest_exit = pytest_exit
    summary.tests = list(tests or [])
    summary.counts = results.counts(tests or [])
    summary.skip_reasons = results.skip_reasons(tests or [])
    summary.splats = [record.SplatRecord(s.kind, s.line, s.excerpt) for s in splats]
    summary.verdict, summary.reason = verdict.label, verdict.reason
    summary.tally, summary.exit_code = verdict.tally, int(verdict.exit_code)


def record_early_end(error: BaseException, out: Path, summary: record.RunRecord,
                     log: Callable[[str], None]) -> BaseException:
    """Record in summary.json why a run ended before its verdict; returns what to raise.

    A RunnerError keeps its code; only Ctrl-C/SIGTERM is "interrupted" (130);
    a full disk or an unwritable file becomes its one-line RunnerError; any
    other exception is a bug in the runner (exit 8): its traceback goes into
    the run's log and RUNNER_TRACEBACK, and the exception is marked so the CLI
    does not print it twice.  Shared by every command that runs a guest.
    """
    known = machine_state_error(error) if isinstance(error, OSError) else None
    if known is not None:
        known.__cause__ = error
        error = known
    if isinstance(error, RunnerError):
        summary.verdict, summary.reason = results.VerdictLabel.ERROR, error.message
        summary.exit_code = int(error.exit_code)
    elif isinstance(error, (KeyboardInterrupt, Interrupted)):
        summary.verdict, summary.reason = results.VerdictLabel.INTERRUPTED, "interrupted"
        summary.exit_code = int(ExitCode.INTERRUPTED)
    elif isinstance(error, Exception):
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        (out / RUNNER_TRACEBACK).write_text(text)
        for line in text.rstrip("\n").splitlines():
            log(line)
        summary.verdict = results.VerdictLabel.RUNNER_BUG
        summary.reason = f"{type(error).__name__}: {error}"
        summary.exit_code, summary.traceback = int(ExitCode.RUNNER_BUG), RUNNER_TRACEBACK
        error.runner_traceback = str(out / RUNNER_TRACEBACK)  # type: ignore[attr-defined]
    return error


def report(verdict: results.Verdict, tests, splats, log: Callable[[str], None]) -> None:
    """Per-test table, distinct skip reasons, splat excerpts, then the one verdict line."""
    log("")
    log(results.format_table(tests or []))
    reasons = results.format_skip_reasons(tests or [])
    if reasons:
        log("skip reasons:")
        log(reasons)
    if splats:
        log("kernel splats:")
        log(results.format_splats(splats))
    log(results.verdict_line(verdict))


def kernel_release(out: Path, fallback: str | None) -> str | None:
    """The release the guest reported (uname -r), else what the image declared."""
    reported = out / artifacts.GUEST_RELEASE_FILE
    if reported.exists():
        text = reported.read_text().strip()
        if text:
            return text
    return fallback


def run_on_target(options: RunOptions, cache: Cache, out: Path, timings: dict,
                  summary: record.RunRecord, log: Callable[[str], None]) -> tuple:
    """Stage 5 for --target: the target already runs its kernel; (status, release) as a boot."""
    assert options.target is not None  # run() calls this only for --target
    outcome = remote.run_on_target(options.target, options.suite, out, options.markers,
                                   options.keyword, options.timeout, options.stall_timeout, log,
                                   cache)
    timings["target"] = round(outcome.seconds, 2)
    summary.target = outcome.facts
    summary.boot = record.BootRecord(results.BootStatus(outcome.status), outcome.detail,
                                     exit_status=outcome.exit_status)
    return outcome.status, outcome.facts.get("release")


def run(options: RunOptions, log: Callable[[str], None] = print) -> int:
    """The whole pipeline; returns the exit code, raises RunnerError for user-fixable problems."""
    run_started = time.monotonic()
    if options.stop:
        return keep.stop(open_cache(options.cache_dir), log)
    validate(options)
    if not options.target and not options.shell:
        # Under a second, before any build: a path the guest cannot see would
        # otherwise surface as a "crash" after the whole build.
        preflight.check_guest_visible(guest_paths(options))
    cache = open_cache(options.cache_dir)
    provider = None
    if not options.target:
        # Inputs are checked before tools, so a typo is reported as itself; both
        # before the output directory exists, so a usage error leaves no empty run.
        provider = kernel_provider(options, cache)
        preflight.check(requirements(provider)
                        + (list(keep.KEEP_TOOLS) if options.keep else []))
    out = artifacts.prepare_output_dir(options.output)
    log(f"output: {out}")

    timings: dict = {}
    summary = record.RunRecord(
        command=["run-selftests", *options.argv],
        reproducer=f"cd {Path.cwd()} && " + artifacts.reproducer(options.argv, out),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host={"python": sys.executable, "python_version": platform.python_version(),
              "machine": platform.machine(), "host_kernel": platform.release()},
        kernel={},
        timings=timings,
        selection={"keyword": options.keyword, "markers": options.markers,
                   "suite": str(options.suite)},
        # Which skips are acceptable depends on it; `parse` re-judges with the same rule.
        target_kind=results.TARGET_SSH if options.target else results.TARGET_VM,
    )
    try:
        target: Target
        if options.target:
            target = SshTarget(options, cache)
        else:
            assert provider is not None  # made above for every run without --target
            kernel = obtain_kernel(provider, out, timings, summary, log)
            plan = accel.plan_for_host(options.accel, cache.kvm_verdict)
            log(f"boot: {plan.reason}")
            if options.shell:
                return boot.run_shell(kernel.image, plan, options.cpus, options.memory, echo=log)

            if options.keep:
                guest = keep.start(kernel.image, plan, cache, options.cpus, options.memory,
                                   options.timeout, log)
                summary.kept_guest = dataclasses.asdict(guest)
                for line in keep.describe(guest):
                    log(line)
                return 0

            backports = known_bug_backports(summary.series)
            kernel_facts(summary)["backported_fixes"] = backports
            suite = Path(options.suite).resolve()
            extra = [f"--kernel-backports={','.join(backports)}"] if backports else []
            command = boot.guest_test_command(
                sys.executable, suite, out, options.markers, options.keyword,
                extra_args=extra + (["--exitfirst"] if options.exitfirst else []),
                pycache_dir=cache.guest_pycache,
                launcher=guest_bundle.launcher_or_plain(cache.guest_bundles, sys.executable,
                                                        suite, log))
            if options.debug_kernel:
                command = debug_kernel.prepare_guest(command, sys.executable, out)
            target = VmTarget(kernel, command, plan, options, cache)
        status, declared_release = target.run(out, summary, log)

        verdict, tests, splats, pytest_exit = judge_output_dir(out, status, target.kind)
        if options.debug_kernel:
            verdict, summary.kmemleak = debug_kernel.judge(out, verdict, log)
        kernel_facts(summary)["release"] = kernel_release(out, declared_release)
        record_verdict(summary, verdict, tests, splats, pytest_exit)
        report(verdict, tests, splats, log)
        return int(verdict.exit_code)
    except BaseException as error:  # noqa: BLE001 - recorded, then raised again
        raise record_early_end(error, out, summary, log)
    finally:
        timings["total"] = round(time.monotonic() - run_started, 2)
        summary.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record.write(out, summary)
        log(progress.format_timings(timings))
        log(f"artifacts: {out}")


def run_recorded(options: RunOptions, log: Callable[[str], None]) -> tuple[int, str | None]:
    """One run of a command made of many (matrix, regressions): (exit code, error or None).

    A run that ends early does not stop the others, and its summary.json says
    how it ended even when it stopped before creating its output directory
    (a usage error).  Only an interruption is raised.
    """
    assert options.output is not None  # each run of many has its own directory
    out = Path(options.output)
    # A summary left by an earlier run in this directory must not pass for this one's.
    (out / artifacts.SUMMARY).unlink(missing_ok=True)
    try:
        return run(options, log=log), None
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception as error:  # noqa: BLE001 - one run's end, in its summary.json
        if isinstance(error, RunnerError):
            code, message, details = error.exit_code, error.message, error.details
        else:
            code = ExitCode.RUNNER_BUG
            message = f"bug in run-selftests ({type(error).__name__}: {error})"
            details = ()
        log(f"run-selftests: error: {message}")
        for line in details:
            log(f"  {line}")
        if not (out / artifacts.SUMMARY).exists():
            out.mkdir(parents=True, exist_ok=True)
            record.write(out, record.RunRecord(verdict=results.VerdictLabel.ERROR,
                                               reason=message, exit_code=int(code)))
        return int(code), message

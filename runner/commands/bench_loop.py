"""`run-selftests bench-loop`: measure the developer's loops on this machine and write the table.

The loops of issue 13, each timed end to end through the real command line:

- warm run, nothing changed: `run-selftests` twice more on the default kernel;
- one-file change: a new line of code at the end of net/core/bpf_sk_storage.c,
  then `run-selftests`.  The edits go to a private copy of the default source
  (--edit-tree, default <output>/linux), never to the cache's shared tree that
  other runs build; the copy gets one settling build first (from ccache);
- guest: boot + tests, the "guest" timing of those runs;
- a second checkout: a `git clone` of this checkout runs `run-selftests` on
  the same source and series and must land in the same build directory;
- the project's own tests: `python -m pytest tests`.

Every run's summary.json is kept under the output directory, and the table
(bench-loop.md) names the median and the range of each loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from runner import record
from runner.cache import open_cache
from runner.errors import UsageError
from runner.progress import format_timings

REPO_ROOT = Path(__file__).resolve().parents[2]  # runner/<package>/<module>.py
EDITED_FILE = Path("net/core/bpf_sk_storage.c")
LOOPS = ("warm", "edit", "checkout", "pytest")
# The targets of issue 13, in seconds (2 cores, TCG, default kernel).
TARGETS = {"edit": 45, "warm": 25, "guest": 20, "pytest": 60}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """bench-loop's options."""
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="where the runs, bench-loop.md and bench-loop.json go "
                             "(not under /var/tmp: the guest cannot see it)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="samples per loop (default 3)")
    parser.add_argument("--loops", default=",".join(LOOPS), metavar="LIST",
                        help=f"which loops, comma-separated (default {','.join(LOOPS)})")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="the runner's cache (default: as run-selftests)")
    parser.add_argument("--edit-tree", type=Path, metavar="DIR",
                        help="kernel tree the edit loop edits and builds with the default "
                             "series (default: a copy of the default source in the output)")


def main(args: argparse.Namespace) -> int:
    """Run the chosen loops, print and write the table; 0 unless a run went wrong."""
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = sorted(set(loops) - set(LOOPS))
    if unknown or args.runs < 1:
        raise UsageError(f"bench-loop: unknown loop {', '.join(unknown)} or --runs < 1; "
                         f"loops are {', '.join(LOOPS)}")
    out = Path(args.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cache = open_cache(args.cache_dir)
    extra = ["--cache-dir", str(cache.root)]
    bench = LoopBench(out, extra, print)
    # The first run builds whatever is stale, so the loops start warm.
    bench.run_selftests("settle", REPO_ROOT)
    rows: list[dict] = []
    if "warm" in loops:
        rows += bench.warm(args.runs)
    if "edit" in loops:
        tree = args.edit_tree or out / "linux"
        if not tree.exists():
            shared = cache.sources / "linux-source-6.1"
            print(f"bench-loop: copying {shared} to {tree} for the edit loop")
            subprocess.run(["cp", "-a", "--reflink=auto", str(shared), str(tree)], check=True)
        rows += bench.edit(args.runs, Path(tree).absolute())
    if "checkout" in loops:
        rows += bench.checkout()
    if "pytest" in loops:
        # Minutes per sample, and its spread is small: once is enough.
        rows += bench.pytest(1)
    table = format_table(rows, machine_note())
    (out / "bench-loop.md").write_text(table)
    (out / "bench-loop.json").write_text(json.dumps(
        {"rows": rows, "samples": bench.samples}, indent=2) + "\n")
    print(table)
    return 1 if bench.failures else 0


class LoopBench:
    """Runs `run-selftests` into numbered output directories and keeps what each one cost."""

    def __init__(self, out: Path, extra: Sequence[str], log: Callable[[str], None]):
        self.out, self.extra, self.log = out, list(extra), log
        self.samples: list[dict] = []
        self.failures: list[str] = []

    def run_selftests(self, label: str, checkout: Path, options: Sequence[str] = ()) -> dict:
        """One `run-selftests` from `checkout`; its wall time and summary.json."""
        run_dir = self.out / f"{label}-{len(self.samples):02d}"
        command = [sys.executable, "-m", "runner.commands.cli", "--output", str(run_dir), *self.extra,
                   *options]
        env = dict(os.environ)
        # A second checkout must run its own runner, not the installed one.
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(checkout / "selftests")])
        self.log(f"bench-loop: {label}: {shlex.join(command)} (in {checkout})")
        started = time.monotonic()
        proc = subprocess.run(command, cwd=checkout, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        wall = time.monotonic() - started
        (self.out / f"{run_dir.name}.log").write_text(proc.stdout)
        # A run that left no usable summary.json is still a sample: its wall time and exit.
        try:
            summary: record.RunRecord | None = record.read(run_dir)
        except (OSError, record.RecordError):
            summary = None
        kernel = (summary.kernel if summary else None) or {}
        build = (summary.build if summary else None) or {}
        timings = (summary.timings if summary else None) or {}
        sample = {"label": label, "wall": round(wall, 1), "exit": proc.returncode,
                  "timings": timings,
                  "build_dir": kernel.get("build_dir"),
                  "make_skipped": build.get("make_skipped"),
                  "build_steps": build.get("steps"),
                  "counts": (summary.counts if summary else None) or {}}
        self.samples.append(sample)
        self.log(f"bench-loop: {label}: {wall:.1f} s, exit {proc.returncode}; "
                 f"{format_timings(timings)}")
        if proc.returncode != 0:
            self.failures.append(f"{label}: exit {proc.returncode} (see {run_dir.name}.log)")
        return sample

    def warm(self, runs: int) -> list[dict]:
        """Nothing changed between runs."""
        samples = [self.run_selftests("warm", REPO_ROOT) for _ in range(runs)]
        return [row("warm run, nothing changed", samples, "wall", TARGETS["warm"]),
                row("guest: boot + tests", samples, "guest", TARGETS["guest"])]

    def edit(self, runs: int, tree: Path) -> list[dict]:
        """A new line of real code in the sk storage source of `tree` before each run."""
        path = tree / EDITED_FILE
        if not path.is_file():
            raise UsageError(f"bench-loop: {path} is missing; pass --edit-tree pointing at a "
                             "Linux tree")
        options = ["--kernel-src", str(tree), "--series",
                   str(REPO_ROOT / "kernel_patches" / "series")]
        self.run_selftests("edit-settle", REPO_ROOT, options)
        original = path.read_bytes()
        samples = []
        try:
            for number in range(runs):
                # Code, not a comment: a comment leaves the preprocessed text the
                # same and ccache would answer without compiling.
                nonce = time.time_ns()
                path.write_bytes(original + (
                    f"\nstatic int __maybe_unused bench_loop_edit_{number} = {nonce % 1000000};\n"
                ).encode())
                samples.append(self.run_selftests("edit", REPO_ROOT, options))
        finally:
            # The content goes back with a new mtime, so the next build compiles
            # it again rather than keeping the edited object.
            path.write_bytes(original)
        return [row(f"one-file change in {EDITED_FILE.name} -> verdict", samples, "wall",
                    TARGETS["edit"]),
                row("  of which build (make)", samples, "build", None)]

    def checkout(self) -> list[dict]:
        """A fresh clone of this checkout builds nothing: same source, same series."""
        clone = self.out / "second-checkout"
        if not clone.exists():
            subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
        # Compare with a run of this checkout on the default source (main() always makes
        # the "settle" one), not with the edit loop's private tree.
        first = [s for s in self.samples if s["label"] in ("settle", "warm")][-1]
        sample = self.run_selftests("checkout", clone)
        same = sample["build_dir"] is not None and sample["build_dir"] == first["build_dir"]
        note = (f"same build directory, make {'skipped' if sample['make_skipped'] else 'ran'}"
                f" ({sample['build_steps']} make steps)" if same else
                f"another build directory: {sample['build_dir']}")
        if not same:
            self.failures.append(f"checkout: {note}")
        result = row("second checkout of the same source and series", [sample], "wall", None)
        result["note"] = note
        return [result]

    def pytest(self, runs: int) -> list[dict]:
        """The project's own test suite, as the README runs it."""
        walls = []
        for _ in range(runs):
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q",
                                   "-p", "no:cacheprovider"], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  check=False)
            wall = time.monotonic() - started
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            self.log(f"bench-loop: pytest tests: {wall:.1f} s: {last}")
            self.samples.append({"label": "pytest", "wall": round(wall, 1),
                                 "exit": proc.returncode, "result": last})
            walls.append({"wall": round(wall, 1)})
            if proc.returncode != 0:
                self.failures.append(f"pytest tests: {last}")
        return [row("`python -m pytest tests` wall time", walls, "wall", TARGETS["pytest"])]


def row(loop: str, samples: Sequence[dict], key: str, target: float | None) -> dict:
    """Median and range of one timing over the samples, and whether it meets the target."""
    values = [s["wall"] if key == "wall" else s.get("timings", {}).get(key) for s in samples]
    values = [v for v in values if v is not None]
    if not values:
        return {"loop": loop, "median": None, "min": None, "max": None, "n": 0,
                "target": target, "met": None}
    median = statistics.median(values)
    return {"loop": loop, "median": round(median, 1), "min": min(values), "max": max(values),
            "n": len(values), "target": target,
            "met": None if target is None else median <= target}


def format_table(rows: Sequence[dict], machine: str) -> str:
    """The markdown table of the loops."""
    lines = [f"Measured by `run-selftests bench-loop` on {machine}", "",
             "| loop | median | range | runs | target | met |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        median = "-" if r["median"] is None else f"{r['median']:.1f} s"
        spread = "-" if r["min"] is None else f"{r['min']:.1f}-{r['max']:.1f} s"
        target = "" if r["target"] is None else f"<= {r['target']} s"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        if r.get("note"):
            met = (met + " " if met else "") + r["note"]
        lines.append(f"| {r['loop']} | {median} | {spread} | {r['n']} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def machine_note() -> str:
    """Cores, load and whether KVM is usable: what the numbers depend on."""
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
            f"at the end, {time.strftime('%Y-%m-%d %H:%M %Z')}")

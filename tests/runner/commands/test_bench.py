"""run-selftests bench on saved results: tables, labels, plot, exit-code mapping, commands.

The fixtures are real bench.json files: host-*.json from `run-selftests bench --host` on
this project's 6.18 host, tcg-1024.json from a 6.1 guest under TCG.  Nothing boots here.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from conftest import TESTS

from runner.commands import bench
from runner.errors import InfrastructureError, UsageError

FIXTURES = TESTS / "fixtures" / "bench"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_point_table_has_the_issue_columns_and_the_seed_rows():
    result = load("host-4096.json")
    table = bench.point_table(result, result["points"][0])
    lines = table.splitlines()
    assert lines[0] == "| variant | ns per run | runs | ratio sk-storage/hash |"
    point = result["points"][0]
    hash_ns = point["ns_per_run"]["hash"]
    assert lines[2].startswith(f"| hash map (socket cookie) | {hash_ns['median']:.1f} [")
    assert f"| {point['runs']['sk_storage']:,} |" in lines[3]
    assert f"{point['ratio_sk_storage_to_hash']['of_medians']:.2f} [paired" in lines[3]
    assert lines[4] == "| seed 6ac99e8f23d4 (hash map, sk pointer key) | 152 | |  |"
    assert lines[5] == "| seed 6ac99e8f23d4 (sk storage) | 66 | | 0.43 |"


def test_header_names_kernel_jit_and_accelerator():
    text = bench.render(load("tcg-1024.json"))
    first = text.splitlines()[0]
    assert first == "kernel 6.1.192 (x86_64), JIT on (bpf_jit_enable=1), accelerator: tcg"


def test_host_result_says_it_ran_on_the_host_kernel():
    text = bench.render(load("host-4096.json"))
    assert "accelerator: none: the host's own kernel (this machine is itself a VM)" in text


def test_sweep_renders_one_row_per_socket_count_and_the_4096_table():
    result = load("host-sweep.json")
    text = bench.render(result)
    assert "| sockets | hash map ns per run | sk storage ns per run | ratio sk-storage/hash |" \
        in text
    for point in result["points"]:
        assert f"\n| {point['sockets']} | " in text
    # The seed's socket count also gets the full table with the seed rows.
    assert "4096 sockets, 20000 datagrams per measurement" in text
    assert "| seed 6ac99e8f23d4 (sk storage) | 66 | | 0.43 |" in text


@pytest.mark.parametrize("jit, expected", [
    ({"bpf_jit_enable": None, "programs_jited": False}, "off (no JIT in this kernel)"),
    ({"bpf_jit_enable": "0", "programs_jited": False},
     "off (bpf_jit_enable=0, programs interpreted)"),
    ({"bpf_jit_enable": "1", "programs_jited": True}, "on (bpf_jit_enable=1)"),
    ({"bpf_jit_enable": "1", "programs_jited": False},
     "off (bpf_jit_enable=1, programs interpreted)"),
])
def test_jit_is_on_only_when_the_programs_were_jited(jit, expected):
    assert bench.jit_label({"jit": jit}) == expected


def test_accel_unknown_without_a_label():
    assert bench.accel_label({"cpu": {"hypervisor": False}}) == "unknown"
    assert bench.accel_label({"cpu": {"hypervisor": True}}).startswith("unknown (the CPU")


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = bench.plot_sweep(load("host-sweep.json"), tmp_path / "sweep.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_still_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "plot_sweep", lambda result, path: None)
    lines: list[str] = []
    bench.report(load("host-sweep.json"), tmp_path, lines.append)
    text = "\n".join(lines)
    assert "| sockets |" in text
    assert "plot: matplotlib is not installed" in text


def test_check_exit_maps_the_module_exit_codes(tmp_path):
    with pytest.raises(bench.BenchFailed, match="no numbers reported: FAILED: hash"):
        bench.check_exit(1, "bench: FAILED: hash with 64 sockets", tmp_path)
    with pytest.raises(UsageError, match="could not run: cannot run: the benchmark needs root"):
        bench.check_exit(2, "bench: cannot run: the benchmark needs root", tmp_path)
    with pytest.raises(InfrastructureError, match="no exit code"):
        bench.check_exit(None, "", tmp_path)
    # Exit 0 without the JSON is not a success either.
    with pytest.raises(InfrastructureError):
        bench.check_exit(0, "", tmp_path)
    (tmp_path / bench.BENCH_JSON).write_text("{}")
    bench.check_exit(0, "", tmp_path)


def test_guest_command_runs_the_module_and_keeps_its_exit_code(tmp_path):
    command = bench.guest_bench_command("/venv/bin/python", Path("/src/selftests"), tmp_path,
                                        ["--sockets", "4096"])
    assert command.startswith("cd /src/selftests; ")
    assert shlex.join(["/venv/bin/python", "-m", "bench", "--sockets", "4096", "--output",
                       str(tmp_path / "bench.json")]) in command
    assert command.endswith(f"echo $? > {tmp_path}/bench-exitcode")


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_module_args_follow_the_options():
    assert bench.guest_module_args(_args()) == ["--repeat", "5", "--packets", "200000",
                                                "--burst", "1", "--sockets", "4096"]
    assert bench.guest_module_args(_args(sweep=True, repeat=3))[-1] == "--sweep"
    with pytest.raises(UsageError):
        bench.guest_module_args(_args(repeat=0))


def test_host_needs_root(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        bench.run_on_host(tmp_path, tmp_path, [], print)


def test_host_refuses_a_kernel_to_boot():
    with pytest.raises(UsageError, match="drop --distro-kernel"):
        bench.main(_args(host=True, distro_kernel="6.1"), argv=[])


def test_from_json_renders_without_running_anything(tmp_path):
    saved = tmp_path / "bench.json"
    saved.write_text((FIXTURES / "tcg-1024.json").read_text())
    lines: list[str] = []
    assert bench.main(_args(from_json=saved), argv=[], log=lines.append) == 0
    assert any(line.startswith("| sk storage | ") for line in "\n".join(lines).splitlines())


def test_perf_counters_render_per_run_and_say_what_was_not_counted():
    # `python3 -m bench --perf --sockets 64 --packets 2000 --repeat 2` as root on the
    # development VM: no virtual PMU, so only the software task clock was counted.
    text = bench.render(load("host-perf-64.json"))
    assert "| counter per run | " in text
    assert "| task_clock_ns | " in text
    for name in ("cycles", "instructions", "cache_references", "cache_misses"):
        assert f"perf: {name} not counted here: ENOENT" in text


def test_perf_is_passed_to_the_guest_module():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert "--perf" in bench.guest_module_args(parser.parse_args(["--perf"]))
    assert "--perf" not in bench.guest_module_args(parser.parse_args([]))

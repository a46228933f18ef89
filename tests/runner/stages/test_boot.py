"""The boot stage's command lines and its console watch, driven through a stand-in vng.

The stand-in is a real process tree under a real pty (pexpect), behaving the
way vng + QEMU do on this machine: under KVM it hangs after "Probing EDD",
under TCG it prints the kernel banner and runs the --exec command.  That
exercises the fallback, panic, stall, timeout and process-group kill paths
without booting anything.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runner import process_group
from runner.errors import InfrastructureError
from runner.stages import accel, boot

STANDIN = textwrap.dedent("""\
    import os, subprocess, sys, time
    args = sys.argv[1:]
    mode = os.environ.get("STANDIN_MODE", "ok")
    pidfile = os.environ.get("STANDIN_PIDFILE")
    # A grandchild standing in for QEMU, to prove the whole group dies.
    qemu = subprocess.Popen(["sleep", "300"])
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{qemu.pid}\\n")
    def say(text):
        print(text, flush=True)
    if mode == "no-qemu":
        say("qemu-system-x86_64: -machine q35: unsupported machine type")
        sys.exit(1)
    if "--disable-kvm" not in args:
        say("Probing EDD (edd=off to disable)... ok")
        if mode == "kvm-error":
            say("KVM internal error. Suberror: 1")
            say("extra data[0]: 0x0000000000000001")
        time.sleep(300)
    say("[    0.000000] Linux version 6.1.0-standin (gcc 12) #1 SMP")
    say("[    0.100000] printk noise the user does not need to see")
    if mode == "panic":
        say("[    2.000000] Kernel panic - not syncing: sysrq triggered crash")
        time.sleep(300)
    if mode == "stall":
        time.sleep(300)
    if mode == "chatty":
        while True:
            say("[    3.000000] still working")
            time.sleep(0.2)
    if mode == "wedge":
        # pytest -v prints the node id without a newline; the kernel's report
        # is glued to it, and then repeats, as an RCU stall does.
        say("test_map_free.py::test_quick PASSED")
        print("test_map_free.py::test_free_while_in_use ", end="", flush=True)
        while True:
            say("[   60.000000] rcu: INFO: rcu_preempt self-detected stall on CPU")
            say("[   60.000001] rcu: \t0-....: (21000 ticks this GP)")
            time.sleep(0.2)
    command = args[args.index("--exec") + 1]
    sys.exit(subprocess.call(["sh", "-c", command]))
    """)


@pytest.fixture
def standin(tmp_path, monkeypatch) -> str:
    script = tmp_path / "vng"
    script.write_text(f"#!{sys.executable}\n" + STANDIN)
    script.chmod(0o755)
    monkeypatch.setenv("STANDIN_PIDFILE", str(tmp_path / "qemu.pids"))
    return str(script)


def qemu_pids(tmp_path: Path) -> list:
    pidfile = tmp_path / "qemu.pids"
    return [int(p) for p in pidfile.read_text().split()] if pidfile.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def run(standin, tmp_path, plan, command="echo 0 > pytest-exitcode", **kwargs):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    lines = []
    outcome = boot.run_guest(
        Path("/boot/vmlinuz-standin"), out, f"cd {out}; {command}", plan,
        out / "console.log", vng=standin, echo=lines.append, **kwargs)
    return outcome, lines, out


def test_vng_command_is_built_in_one_place():
    command = boot.vng_command("/venv/bin/vng", Path("/k/bzImage"), "tcg", 2, "2G",
                               [Path("/out")], "echo hi")
    assert command == ["/venv/bin/vng", "--run", "/k/bzImage", "--verbose", "--force-9p",
                       "--user", "root", "--cpus", "2", "--memory", "2G", "--disable-kvm",
                       "--append", "no_timer_check", "--rwdir", "/out", "--exec", "echo hi"]
    kvm = boot.vng_command("vng", Path("/k"), "kvm", 4, "4G", [], None)
    assert "--disable-kvm" not in kvm and "--exec" not in kvm and "--rwdir" not in kvm


def test_guest_command_runs_pytest_and_reports_its_exit_code_in_a_file():
    command = boot.guest_test_command("/venv/bin/python3", Path("/repo/selftests"),
                                      Path("/runs/x y"), "not stress", "map and not btf")
    assert command.startswith("cd /repo/selftests; export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1; "
                              "export PYTHONDONTWRITEBYTECODE=1; ")
    assert ("/venv/bin/python3 -m pytest /repo/selftests '--junitxml=/runs/x y/junit.xml' "
            "-p no:cacheprovider -v -rfEs --color=no -m 'not stress' -k 'map and not btf';"
            ) in command
    assert command.endswith("echo $? > '/runs/x y/pytest-exitcode'")


def test_a_pycache_dir_keeps_the_guests_bytecode_instead_of_none(tmp_path):
    command = boot.guest_test_command("py", Path("/s"), Path("/o"), None, None,
                                      pycache_dir=Path("/c/guest pycache"))
    assert "export PYTHONPYCACHEPREFIX='/c/guest pycache'; " in command
    assert "PYTHONDONTWRITEBYTECODE" not in command


def test_rw_dirs_are_created_and_writable_in_the_guest(standin, tmp_path):
    pycache = tmp_path / "cache" / "guest-pycache"
    outcome, _, out = run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"),
                          rw_dirs=[pycache])
    assert pycache.is_dir()
    assert outcome.command[outcome.command.index("--rwdir") + 1:][:3] == [
        str(out), "--rwdir", str(pycache)]


def test_extra_pytest_arguments_go_last_and_quoted():
    command = boot.guest_test_command("py", Path("/s"), Path("/o"), None, None,
                                      extra_args=["--deselect", "test_a.py::test_b[x y]"])
    assert "--color=no --deselect 'test_a.py::test_b[x y]';" in command


@pytest.mark.parametrize("term", ["xterm-256color", "dumb", None])
def test_the_guest_never_inherits_a_colour_terminal(standin, tmp_path, monkeypatch, term):
    """virtme-ng puts TERM on the guest's kernel command line: a logged run gets dumb."""
    if term is None:
        monkeypatch.delenv("TERM", raising=False)
    else:
        monkeypatch.setenv("TERM", term)
    outcome, _, out = run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"),
                          command='echo "TERM=$TERM"; echo 0 > pytest-exitcode')
    assert outcome.status == "exited"
    assert "TERM=dumb" in (out / "console.log").read_text()


def test_auto_falls_back_to_tcg_when_kvm_hangs(standin, tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "KVM_PROBE_SECONDS", 1.0)
    monkeypatch.setattr(boot, "judge_kvm",
                        lambda console, elapsed, exited: accel.judge_kvm(console, elapsed,
                                                                         exited, window=1.0))
    plan = accel.plan_accel("auto", True, "/dev/kvm is usable")
    outcome, lines, out = run(standin, tmp_path, plan)
    assert outcome.status == "exited" and outcome.exit_status == 0
    assert outcome.accel == "tcg"
    assert "fell back to tcg: no kernel output under KVM within 1 s" in outcome.accel_reason
    assert outcome.attempts[0].startswith("kvm: no kernel output")
    assert "--disable-kvm" in outcome.command
    assert (out / "pytest-exitcode").read_text() == "0\n"
    log = (out / "console.log").read_text()
    assert "Probing EDD" in log and "Linux version 6.1.0-standin" in log
    assert any("retrying with tcg" in line for line in lines)
    # Kernel printk lines are logged but not echoed without --verbose.
    assert not any("printk noise" in line for line in lines)
    assert all(not alive(pid) for pid in qemu_pids(tmp_path))


def test_a_kvm_error_falls_back_at_once_and_names_the_error(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "kvm-error")
    started = time.monotonic()
    outcome, _, _ = run(standin, tmp_path, accel.plan_accel("auto", True, "usable"))
    assert outcome.accel == "tcg" and outcome.status == "exited"
    assert outcome.accel_reason == (
        "auto: fell back to tcg: QEMU reported 'KVM internal error. Suberror: 1' under KVM")
    assert outcome.kvm_failure == "QEMU reported 'KVM internal error. Suberror: 1' under KVM"
    # Wall-clock time of the fallback, for the remembered verdict.
    assert time.time() - accel.KVM_PROBE_SECONDS * 4 < outcome.kvm_failed_at <= time.time()
    assert time.monotonic() - started < accel.KVM_PROBE_SECONDS


def test_tcg_boot_reports_the_banner_time(standin, tmp_path):
    outcome, _, _ = run(standin, tmp_path, accel.AccelPlan("tcg", None, "--accel tcg"),
                        verbose=True)
    assert outcome.banner_seconds is not None and outcome.banner_seconds < 10
    assert outcome.accel == "tcg" and outcome.attempts == ["tcg: guest exited with status 0"]
    assert outcome.kvm_failure is None and outcome.kvm_failed_at is None


def test_a_panic_ends_the_run_early(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "panic")
    monkeypatch.setattr(boot, "PANIC_DRAIN_SECONDS", 0.5)
    started = time.monotonic()
    outcome, _, _ = run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"), timeout=60)
    assert outcome.status == "panic"
    assert time.monotonic() - started < 20
    assert all(not alive(pid) for pid in qemu_pids(tmp_path))


def test_a_silent_guest_is_stopped_as_stalled(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "stall")
    outcome, _, _ = run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"),
                        timeout=60, stall_timeout=1)
    assert outcome.status == "stalled" and "no console output for 1 s" in outcome.detail
    assert all(not alive(pid) for pid in qemu_pids(tmp_path))


def test_a_busy_guest_is_stopped_at_the_timeout(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "chatty")
    started = time.monotonic()
    # Output every 0.2 s keeps the 1 s stall watch quiet: only the deadline can end it.
    outcome, _, _ = run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"),
                        timeout=1.5, stall_timeout=1)
    assert outcome.status == "timeout"
    assert 1.5 <= time.monotonic() - started < 15
    assert all(not alive(pid) for pid in qemu_pids(tmp_path))


def test_a_wedged_kernel_ends_the_run_and_names_the_running_test(standin, tmp_path,
                                                                  monkeypatch):
    """Stall reports keep the console busy: the grace after them ends the run, not --timeout."""
    monkeypatch.setenv("STANDIN_MODE", "wedge")
    monkeypatch.setattr(boot, "WEDGE_GRACE_SECONDS", 1.0)
    started = time.monotonic()
    outcome, _, out = run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"),
                          timeout=60, stall_timeout=30)
    assert outcome.status == "wedged"
    assert outcome.detail == ("kernel wedged: RCU stall reported, then no test output for 1 s "
                              "during test_map_free.py::test_free_while_in_use")
    assert time.monotonic() - started < 30
    assert "self-detected stall" in (out / "console.log").read_text()
    assert all(not alive(pid) for pid in qemu_pids(tmp_path))

    from runner.commands.pipeline import judge_output_dir

    verdict = judge_output_dir(out, outcome.status)[0]
    assert verdict.exit_code == 3
    assert verdict.reason.startswith("RCU stall at console line ")
    assert verdict.reason.endswith(" during test_map_free.py::test_free_while_in_use")


def feed(watch: boot.WedgeWatch, lines: list[tuple[float, str]]) -> None:
    for when, line in lines:
        watch.line(line, when)


def test_wedge_watch_needs_a_stall_report_then_a_quiet_grace():
    watch = boot.WedgeWatch(grace=30)
    feed(watch, [(0, "test_a.py::test_x PASSED"), (1, "test_a.py::test_y "),
                 (2, "[   12.000000] WARNING: CPU: 0 PID: 1 at net/core/x.c:1 f+0x1/0x2")])
    # A WARNING is a splat, but not a wedge: the run goes on.
    assert watch.wedged(100) is None
    feed(watch, [(3, ("[   33.000000] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! "
                      "[python3:99]"))])
    assert watch.wedged(32.9) is None
    assert watch.wedged(33) == ("kernel wedged: soft lockup reported, then no test output "
                                "for 30 s during test_a.py::test_y")


def test_wedge_watch_is_disarmed_by_test_output_and_rearmed_by_the_next_report():
    watch = boot.WedgeWatch(grace=30)
    feed(watch, [(0, ("test_a.py::test_x [  120.000000] INFO: task python3:9 blocked for "
                      "more than 120 seconds.")),
                 (5, "PASSED"), (6, "test_a.py::test_z PASSED")])
    # The tests moved on after the report: a long quiet test later is not a wedge.
    assert watch.wedged(1000) is None
    feed(watch, [(7, "test_a.py::test_w "),
                 (8, "[  141.000000] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:")])
    assert watch.wedged(37.9) is None
    assert watch.wedged(38).endswith("during test_a.py::test_w")


def test_wedge_watch_names_the_test_still_on_the_unfinished_line():
    watch = boot.WedgeWatch(grace=1)
    feed(watch, [(0, "[   61.000000] rcu: INFO: rcu_preempt self-detected stall on CPU")])
    assert watch.wedged(2, partial="test_b.py::test_q[ipv6] ") == (
        "kernel wedged: RCU stall reported, then no test output for 1 s during "
        "test_b.py::test_q[ipv6]")
    assert watch.wedged(2).endswith("for 1 s")


def test_qemu_failing_to_start_is_an_infrastructure_error(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "no-qemu")
    with pytest.raises(InfrastructureError) as error:
        run(standin, tmp_path, accel.AccelPlan("tcg", None, "t"))
    assert error.value.exit_code == 7
    assert "unsupported machine type" in error.value.message


def test_interrupting_the_runner_kills_the_whole_guest(tmp_path):
    """Ctrl-C in the runner: QEMU (here its stand-in) must not outlive it."""
    script = tmp_path / "vng"
    script.write_text(f"#!{sys.executable}\n" + STANDIN)
    script.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""\
        from pathlib import Path
        from runner.stages import accel, boot
        out = Path({str(tmp_path / 'out')!r}); out.mkdir()
        boot.run_guest(Path("/k"), out, "echo guest-started; sleep 300", accel.AccelPlan("tcg", None, "t"),
                       out / "console.log", vng={str(script)!r},
                       echo=lambda line: print(line, flush=True))
        """))
    import subprocess

    env = dict(os.environ, STANDIN_PIDFILE=str(tmp_path / "qemu.pids"))
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.PIPE,
                            text=True)
    # Interrupt once the guest command's first line is echoed: run_guest is in its watch loop.
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=30), "the stand-in guest never started"
    assert proc.stdout.readline().strip() == "guest-started"
    pids = qemu_pids(tmp_path)
    assert pids and all(alive(pid) for pid in pids)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert all(not alive(pid) for pid in pids)


def test_a_group_of_zombies_is_dead_but_a_live_member_keeps_it_alive():
    """Orphans wait for PID 1 to reap them; the kill must not wait for that."""
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""\
        import os, sys, time
        for live in (False, True):
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)
                if live:
                    time.sleep(60)
                os._exit(0)
            print(pid, flush=True)
        time.sleep(60)  # never reaps the first child: it stays a zombie
        """)], stdout=subprocess.PIPE, text=True)
    try:
        zombie, live = int(parent.stdout.readline()), int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while alive(zombie) and time.monotonic() < deadline:
            time.sleep(0.01)
        # The live child makes its group with setpgid after the parent printed its pid.
        while not process_group.exists(live) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not process_group.alive(zombie)
        assert process_group.alive(live)
    finally:
        os.killpg(live, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_a_launcher_replaces_python_dash_m():
    launcher = ["/venv/bin/python3", "-S", "/repo/runner/guest/import_bundle.py", "/b", "/site", "-m"]
    command = boot.guest_test_command("/venv/bin/python3", Path("/s"), Path("/o"), None, None,
                                      launcher=launcher)
    assert " ".join(launcher) + " pytest /s " in command
    assert "/venv/bin/python3 -m pytest" not in command

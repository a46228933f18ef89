"""runner.process_group on real process groups: escalation, early end, Ctrl-C while waiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from runner import process_group

# Ignores SIGTERM (and SIGINT), so only the escalation to SIGKILL ends it.
STUBBORN = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")


def start(code: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def gone_for(process: subprocess.Popen):
    def gone() -> bool:
        process.poll()
        return not process_group.exists(process.pid)
    return gone


def test_a_group_that_ignores_sigterm_is_killed_after_its_grace():
    process = start(STUBBORN)
    started = time.monotonic()
    assert process_group.stop(process.pid, ((signal.SIGTERM, 0.5), (signal.SIGKILL, 5.0)),
                              gone_for(process), poll=0.05)
    assert process.wait(timeout=5) == -signal.SIGKILL
    # SIGTERM's grace was spent in full, SIGKILL's wait ended as soon as the group was gone.
    assert 0.5 <= time.monotonic() - started < 3.0


def test_a_group_that_obeys_ends_the_wait_at_once():
    process = start("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    started = time.monotonic()
    assert process_group.stop(process.pid, ((signal.SIGTERM, 30.0),), gone_for(process),
                              poll=0.05)
    assert process.wait(timeout=5) == -signal.SIGTERM
    assert time.monotonic() - started < 5.0
    # Nothing left to signal: done, not an error.
    assert process_group.stop(process.pid, ((signal.SIGKILL, 1.0),), lambda: False)
    assert not process_group.exists(process.pid)


def test_ctrl_c_while_waiting_moves_on_to_the_next_signal():
    process = start(STUBBORN)
    said = []
    polls = iter(range(1000))

    def gone() -> bool:
        # The first poll is interrupted, as a Ctrl-C during the grace would be.
        if next(polls) == 0:
            raise KeyboardInterrupt
        return gone_for(process)()

    assert process_group.stop(process.pid, ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)),
                              gone, poll=0.05, on_interrupt=lambda: said.append("still"))
    assert said == ["still"] and process.wait(timeout=5) == -signal.SIGKILL

"""runner.atomic_file, runner.file_lock and runner.markdown: the small shared helpers."""

from __future__ import annotations

import subprocess
import sys
import time

from runner import atomic_file, file_lock
from runner.markdown import cell


def test_atomic_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    before = target.stat().st_ino
    assert atomic_file.write_text(target, "new\n") == target
    assert target.read_text() == "new\n"
    # A rename, not an in-place write: a reader holding the old file keeps the old content.
    assert target.stat().st_ino != before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_second_holder_waits_and_says_so_once(tmp_path):
    lock = tmp_path / "locks" / ".lock"
    lock.parent.mkdir()
    code = ("import fcntl, os, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(0.5)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    # The holder creates the file itself; wait for it to hold the lock.
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    said: list[str] = []
    started = time.monotonic()
    with file_lock.exclusive(lock, "waiting for the other holder", said.append):
        waited = time.monotonic() - started
    holder.wait(timeout=5)
    assert said == ["waiting for the other holder"] and waited >= 0.2
    # Free: no message at all.
    with file_lock.exclusive(lock, "never said", said.append):
        pass
    assert said == ["waiting for the other holder"]


def test_a_cell_is_one_line_with_pipes_escaped_and_an_optional_limit():
    assert cell("a | b\n  c") == "a \\| b c"
    assert cell("x" * 10, 5) == "xxxx…"
    assert cell(3) == "3"

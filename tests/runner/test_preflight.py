"""Missing tools are reported all at once, with the command that installs them; paths the
guest cannot see are refused up front."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from runner import preflight
from runner.errors import ExitCode, UsageError


def test_every_missing_requirement_is_reported_once():
    present = {"make", "gcc"}
    absent = preflight.missing(
        preflight.BUILD_TOOLS + preflight.BOOT_TOOLS + preflight.BUILD_TOOLS,
        which=lambda name: f"/usr/bin/{name}" if name in present else None,
        exists=lambda path: path == "/usr/include/gelf.h",
    )
    names = [r.name for r in absent]
    assert names == ["flex", "bison", "bc", "pahole", "libssl headers",
                     "virtme-configkernel", "qemu-system-x86_64", "vng", "virtme-run", "busybox"]
    assert "libelf headers" not in names  # one of its alternative headers exists


def test_install_hint_splits_apt_and_pip():
    absent = [r for r in preflight.BUILD_TOOLS + preflight.BOOT_TOOLS
              if r.name in ("pahole", "qemu-system-x86_64", "vng", "virtme-run")]
    assert preflight.install_hint(absent, is_root=False) == (
        "sudo apt-get install dwarves qemu-system-x86 && pip install virtme-ng")
    assert preflight.install_hint(absent, is_root=True).startswith("apt-get install dwarves")


def test_check_raises_one_line_listing_everything(monkeypatch):
    monkeypatch.setattr(preflight, "find_tool",
                        lambda name: None if name in ("pahole", "bc") else "/bin/true")
    with pytest.raises(UsageError) as error:
        preflight.check(preflight.BUILD_TOOLS)
    assert error.value.exit_code == ExitCode.USAGE
    assert "\n" not in error.value.message
    assert error.value.message.startswith("missing: bc, pahole; install with: ")
    assert "apt-get install bc dwarves" in error.value.message


def test_find_tool_prefers_the_running_venv(tmp_path, monkeypatch):
    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    fake_python = venv_bin / "python"
    fake_python.write_text("")
    vng = venv_bin / "vng"
    vng.write_text("#!/bin/sh\n")
    vng.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    assert preflight.find_tool("vng") == str(vng)


def test_find_tool_searches_sbin_for_an_ordinary_users_path(monkeypatch):
    if not any(os.path.exists(os.path.join(d, "depmod")) for d in ("/usr/sbin", "/sbin")):
        pytest.skip("depmod is not installed here")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert preflight.find_tool("depmod").endswith("/depmod")


def test_this_machine_has_what_a_build_and_boot_need():
    # The project's CI machine is set up by ci/setup-host; a gap here means the
    # runner would refuse to start there.
    absent = preflight.missing(preflight.BUILD_TOOLS + preflight.BOOT_TOOLS
                               + preflight.DISTRO_KERNEL_TOOLS + preflight.GIT_TOOLS
                               + preflight.PLAIN_TREE_TOOLS)
    if absent and os.environ.get("CI") != "true":
        pytest.skip(f"not a fully set-up machine: {', '.join(r.name for r in absent)}")
    assert absent == []


# --- paths virtme-ng's guest cannot see ------------------------------------------------------

def test_the_masked_list_is_the_one_virtme_ng_mounts_tmpfs_over():
    """Every `mount -t tmpfs ... /var/...` in the installed virtme-init is in the list."""
    import re

    import virtme.guest

    init = Path(virtme.guest.__file__).parent / "virtme-init"
    mounted = set(re.findall(r"mount -t tmpfs(?: -o \S+)? \S+ (/var/[\w/.-]+?)/?$",
                             init.read_text(), re.MULTILINE))
    assert mounted >= {"/var/log", "/var/tmp", "/var/cache"}
    assert mounted <= set(preflight.GUEST_MASKED_DIRS), mounted - set(preflight.GUEST_MASKED_DIRS)


@pytest.mark.parametrize("path, masked", [
    ("/var/tmp/x/selftests", "/var/tmp"),
    ("/var/tmp", "/var/tmp"),
    ("/var/cache/ci/run", "/var/cache"),
    ("/var/lib/apt/x", "/var/lib/apt"),
    ("/var/run/user/0/x", "/run"),      # /var/run -> /run on Debian
    ("/var/tmpfoo/x", None),            # a prefix of the name is not the directory
    ("/var/lib/dpkg/x", None),
    ("/tmp/x", None),
    ("/srv/ci/run", None),
])
def test_masked_in_guest(path, masked):
    assert preflight.masked_in_guest(Path(path)) == masked


def test_a_symlink_into_a_masked_directory_is_seen_through(tmp_path):
    link = tmp_path / "checkout"
    link.symlink_to("/var/tmp")
    assert preflight.masked_in_guest(link / "selftests") == "/var/tmp"


def test_the_refusal_is_one_line_naming_path_and_what_to_do():
    paths = [preflight.GuestPath("--output", Path("/srv/ok"), "n/a"),
             preflight.GuestPath("--output", Path("/var/log/run"), "pass --output elsewhere")]
    with pytest.raises(UsageError) as caught:
        preflight.check_guest_visible(paths)
    message = caught.value.message
    assert "\n" not in message
    assert message == ("--output /var/log/run is under /var/log, which virtme-ng's guest covers "
                       "with an empty tmpfs, so the guest would not see it; pass --output "
                       "elsewhere")
    preflight.check_guest_visible(paths[:1])

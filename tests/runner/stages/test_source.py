"""Kernel source selection: user trees, --base worktrees, the cached Debian source."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from runner.cache import Cache
from runner.errors import ExitCode, UsageError
from runner.stages import source


def kernel_like(root: Path, sublevel: int = 192) -> Path:
    (root / "arch" / "x86").mkdir(parents=True)
    (root / "Kconfig").write_text("mainmenu \"Linux\"\n")
    (root / "Makefile").write_text(
        f"# SPDX-License-Identifier: GPL-2.0\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = {sublevel}\n"
        "EXTRAVERSION =\nNAME = Curry Ramen\n")
    return root


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    root = kernel_like(tmp_path / "linux")
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "Test")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v6.1.192")
    git(root, "tag", "v6.1.192")
    (root / "Makefile").write_text((root / "Makefile").read_text().replace("192", "193"))
    git(root, "commit", "-qam", "v6.1.193")
    return root


def test_tree_version_reads_the_makefile(tmp_path):
    assert source.tree_version(kernel_like(tmp_path / "k")) == "6.1.192"


def test_a_missing_source_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as error:
        source.open_user_source(tmp_path / "linux")
    assert error.value.exit_code == ExitCode.USAGE
    assert error.value.message == (f"--kernel-src {tmp_path / 'linux'}: no such directory; "
                                   "pass the top of a kernel tree")


def test_a_directory_that_is_not_a_kernel_tree_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Makefile").write_text("all:\n")
    with pytest.raises(UsageError, match=r"is not a kernel tree \(no Kconfig, arch/x86\)"):
        source.open_user_source(tmp_path / "src")


def test_a_tree_configured_in_place_is_refused_with_the_fix(tmp_path):
    tree = kernel_like(tmp_path / "linux")
    (tree / ".config").write_text("CONFIG_X=y\n")
    with pytest.raises(UsageError, match="make mrproper"):
        source.open_user_source(tree)


def test_git_and_plain_trees_are_told_apart(tmp_path, repo):
    plain = source.open_user_source(kernel_like(tmp_path / "plain"))
    assert not plain.is_git and plain.revision is None
    tracked = source.open_user_source(repo)
    assert tracked.is_git and tracked.revision == git(repo, "rev-parse", "HEAD")
    assert tracked.version == "6.1.193"
    # A plain tree that merely sits inside some git checkout is still plain.
    inner = kernel_like(repo / "tools" / "vendored")
    assert not source.open_user_source(inner).is_git


def test_base_builds_in_a_reused_worktree_and_leaves_the_checkout_alone(tmp_path, repo):
    cache = Cache(tmp_path / "cache")
    user = source.open_user_source(repo)
    head_before = git(repo, "rev-parse", "HEAD")
    based = source.checkout_base(user, "v6.1.192", cache)
    assert based.path.parent == cache.worktrees
    assert based.version == "6.1.192"
    assert based.revision == git(repo, "rev-parse", "v6.1.192^{commit}")
    assert git(repo, "rev-parse", "HEAD") == head_before
    assert git(repo, "status", "--porcelain") == ""
    stamp = (based.path / "Kconfig").stat().st_mtime_ns
    again = source.checkout_base(user, "v6.1.192", cache)
    assert again.path == based.path
    assert (again.path / "Kconfig").stat().st_mtime_ns == stamp  # reused, not recreated


def test_base_with_an_unknown_revision_is_a_usage_error(tmp_path, repo):
    with pytest.raises(UsageError, match="--base v9.9: no such commit"):
        source.checkout_base(source.open_user_source(repo), "v9.9", Cache(tmp_path / "cache"))


def test_base_needs_a_git_tree(tmp_path):
    plain = source.open_user_source(kernel_like(tmp_path / "plain"))
    with pytest.raises(UsageError, match="--base needs a git tree"):
        source.checkout_base(plain, "HEAD", Cache(tmp_path / "cache"))


def test_the_default_source_is_reused_from_its_stamp_without_apt(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    kernel_like(cache.sources / "linux-source-6.1")
    (cache.sources / "linux-source-6.1.stamp.json").write_text(
        json.dumps({"package": "linux-source-6.1", "version": "6.1.192-2"}))

    def no_network(*args, **kwargs):
        raise AssertionError("apt must not be consulted when the stamp is there")

    monkeypatch.setattr(source.debian_archive, "refresh_lists", no_network)
    found = source.ensure_default_source(cache)
    assert found.path == (cache.sources / "linux-source-6.1").resolve()
    assert found.origin == "Debian linux-source-6.1 6.1.192-2"
    assert not found.is_git and found.version == "6.1.192"


def test_debian_versions_map_to_the_makefile_version():
    assert source.upstream_version("6.1.192-2") == "6.1.192"
    assert source.upstream_version("1:6.1.192-2+b1") == "6.1.192"


def test_tarball_extraction_reports_every_file(tmp_path):
    tree = kernel_like(tmp_path / "linux-source-6.1")
    (tree / "scripts").mkdir()
    script = tree / "scripts" / "setlocalversion"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    with tarfile.open(tarball, "w:xz") as archive:
        archive.add(tree, arcname="linux-source-6.1")
    count = source.extract_tarball_with_progress(tarball, tmp_path / "out")
    assert count == 7  # 4 directories + 3 files
    extracted = tmp_path / "out" / "linux-source-6.1"
    assert source.tree_version(extracted) == "6.1.192"
    assert (extracted / "scripts" / "setlocalversion").stat().st_mode & 0o100

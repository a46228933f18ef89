"""Prebuilt kernels: boot-image validation, module staging, Debian package selection."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from runner.cache import Cache, default_cache_dir
from runner.errors import ExitCode, InfrastructureError, UsageError
from runner.preflight import find_tool
from runner.stages import debian_archive, prebuilt


def fake_bzimage(path: Path, version: str = "6.1.0-test (me@host) #1 SMP") -> Path:
    """The parts of an x86 boot header the validator reads, laid out as the kernel does."""
    image = bytearray(0x4000)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    offset = 0x1000
    image[0x20E:0x210] = (offset - 0x200).to_bytes(2, "little")
    image[offset:offset + len(version) + 1] = version.encode() + b"\0"
    path.write_bytes(bytes(image))
    return path


def real_kernel_images() -> list:
    """bzImages/vmlinuz files this machine already has (built or fetched earlier)."""
    cache = default_cache_dir()
    found = list(cache.glob("build/*/obj/arch/x86/boot/bzImage"))
    found += list(cache.glob("distro-kernels/*/boot/vmlinuz-*"))
    found += list(cache.glob("distro-kernels/*/usr/lib/modules/*/vmlinuz"))
    found += list(Path("/boot").glob("vmlinuz-*"))
    return [p for p in found if os.access(p, os.R_OK)]


def test_boot_header_gives_the_release(tmp_path):
    image = fake_bzimage(tmp_path / "bzImage")
    assert prebuilt.read_boot_header(image) == "6.1.0-test"


@pytest.mark.skipif(not real_kernel_images(), reason="no real kernel image on this machine yet")
def test_boot_header_of_a_real_kernel():
    image = real_kernel_images()[0]
    release = prebuilt.read_boot_header(image)
    assert release and release[0].isdigit(), (image, release)


@pytest.mark.parametrize("content", [b"", b"#!/bin/sh\necho not a kernel\n", b"\x7fELF" + b"\0" * 0x400])
def test_a_file_that_is_not_a_kernel_is_refused(tmp_path, content):
    path = tmp_path / "vmlinux"
    path.write_bytes(content)
    assert prebuilt.read_boot_header(path) is None
    with pytest.raises(UsageError) as error:
        prebuilt.open_kernel_image(path, None, Cache(tmp_path / "cache"))
    assert error.value.exit_code == ExitCode.USAGE
    assert "is not an x86 kernel image" in error.value.message


def test_a_missing_image_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        prebuilt.open_kernel_image(tmp_path / "nope", None, Cache(tmp_path / "cache"))


def test_image_and_modules_are_staged_where_virtme_ng_looks(tmp_path):
    image = fake_bzimage(tmp_path / "bzImage")
    modules = tmp_path / "install" / "lib" / "modules" / "6.1.0-test"
    (modules / "kernel").mkdir(parents=True)
    kernel = prebuilt.open_kernel_image(image, tmp_path / "install", Cache(tmp_path / "cache"))
    assert kernel.release == "6.1.0-test"
    assert kernel.modules_dir == modules
    root = kernel.image.parent.parent
    assert kernel.image.name == "vmlinuz-6.1.0-test"
    assert kernel.image.resolve() == image.resolve()
    assert (root / "lib" / "modules" / "6.1.0-test").resolve() == modules
    # Staging twice is idempotent.
    again = prebuilt.open_kernel_image(image, modules, Cache(tmp_path / "cache"))
    assert again.image == kernel.image


def test_a_modules_dir_that_is_not_one_is_refused(tmp_path):
    image = fake_bzimage(tmp_path / "bzImage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="does not look like a lib/modules"):
        prebuilt.open_kernel_image(image, tmp_path / "empty", Cache(tmp_path / "cache"))


@pytest.mark.parametrize("depends, version, expected", [
    ("linux-image-6.1.0-50-amd64 (= 6.1.176-1)", "6.1", "linux-image-6.1.0-50-amd64"),
    ("linux-image-6.12.117+deb13-amd64", "6.12", "linux-image-6.12.117+deb13-amd64"),
    ("linux-base-amd64, linux-image-7.2.13+deb14-amd64", "7.2", "linux-image-7.2.13+deb14-amd64"),
    ("linux-image-5.10.0-32-amd64", "5.10", "linux-image-5.10.0-32-amd64"),
    # sid moved on: 7.2 is gone, and 6.1 must not match 6.12.
    ("linux-image-7.3.1+deb14-amd64", "7.2", None),
    ("linux-image-6.12.117+deb13-amd64", "6.1", None),
])
def test_the_versioned_image_package_is_picked_from_the_metapackage(depends, version, expected):
    assert prebuilt.distro_package_name(depends, version) == expected


def test_an_unknown_distro_version_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="choose one of 5.10, 6.1, 6.12, 7.2"):
        prebuilt.fetch_distro_kernel("4.19", Cache(tmp_path))


# linux-image-7.2.13+deb14-amd64's Depends in Debian sid: the package itself is empty.
SID_7_2_DEPENDS = (
    "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
    "linux-base-7.2.13+deb14-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), "
    "linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)")
SID_RELEASE = "7.2.13+deb14-amd64"


def test_a_split_image_package_names_its_parts_with_their_versions():
    assert prebuilt.split_packages(f"linux-image-{SID_RELEASE}", SID_7_2_DEPENDS) == [
        (f"linux-base-{SID_RELEASE}", "7.2.13-1"),
        (f"linux-binary-{SID_RELEASE}", "7.2.13-1"),
        (f"linux-modules-{SID_RELEASE}", "7.2.13-1"),
    ]


@pytest.mark.parametrize("package, depends", [
    ("linux-image-6.1.0-50-amd64",
     "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"),
    ("linux-image-6.12.117+deb13-amd64",
     "kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"),
])
def test_a_whole_image_package_has_no_parts(package, depends):
    # Debian's real Depends up to 6.12: linux-base is the shared tool package, not a part.
    assert prebuilt.split_packages(package, depends) == []


def extracted_tree(root: Path, layout: str, release: str) -> Path:
    """A dpkg-deb -x tree as each Debian kernel generation lays it out."""
    (root / "usr" / "share" / "doc" / f"linux-image-{release}").mkdir(parents=True)
    if layout == "empty":  # sid's linux-image-R alone
        return root
    modules = {"lib": root / "lib" / "modules" / release,
               "usr-lib": root / "usr" / "lib" / "modules" / release,
               "split": root / "usr" / "lib" / "modules" / release}[layout]
    (modules / "kernel" / "net").mkdir(parents=True)
    if layout == "split":
        fake_bzimage(modules / "vmlinuz", f"{release} (debian-kernel@lists.debian.org) #1")
    else:
        (root / "boot").mkdir()
        fake_bzimage(root / "boot" / f"vmlinuz-{release}", f"{release} (me@host) #1")
        (root / "boot" / f"config-{release}").write_text("CONFIG_BPF=y\n")
    return root


@pytest.mark.parametrize("layout, release, image, modules", [
    # 5.10 and 6.1: boot/ and lib/modules.
    ("lib", "6.1.0-50-amd64", "boot/vmlinuz-6.1.0-50-amd64", "lib/modules/6.1.0-50-amd64"),
    # 6.12: boot/ and usr/lib/modules.
    ("usr-lib", "6.12.117+deb13-amd64", "boot/vmlinuz-6.12.117+deb13-amd64",
     "usr/lib/modules/6.12.117+deb13-amd64"),
    # sid's 7.2, linux-binary-R + linux-modules-R: the image inside the modules dir.
    ("split", SID_RELEASE, f"usr/lib/modules/{SID_RELEASE}/vmlinuz",
     f"usr/lib/modules/{SID_RELEASE}"),
])
def test_the_kernel_is_found_in_every_debian_layout(tmp_path, layout, release, image, modules):
    root = extracted_tree(tmp_path, layout, release)
    found = prebuilt.find_kernel_layout(root)
    assert found == prebuilt.KernelLayout(root / image, release, root / modules)
    assert prebuilt.read_boot_header(found.image) == release


def test_an_empty_image_package_has_no_kernel(tmp_path):
    assert prebuilt.find_kernel_layout(extracted_tree(tmp_path, "empty", SID_RELEASE)) is None


def test_a_modules_dir_without_an_image_is_no_kernel(tmp_path):
    (tmp_path / "usr" / "lib" / "modules" / SID_RELEASE / "kernel").mkdir(parents=True)
    assert prebuilt.find_kernel_layout(tmp_path) is None


def fake_deb(tmp_path: Path, package: str, tree: Callable[[Path], None]) -> Path:
    """A real .deb (dpkg-deb --build) holding the files `tree` makes."""
    root = tmp_path / "debs" / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 7.2.13-1\nArchitecture: amd64\n"
        "Maintainer: test <test@example.org>\nDescription: test\n")
    (root / "usr" / "share" / "doc" / package).mkdir(parents=True)
    tree(root)
    deb = tmp_path / "debs" / f"{package}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def split_kernel_archive(tmp_path: Path) -> dict:
    """sid's 7.2 as package name -> (.deb, Depends), built with dpkg-deb."""
    moddir = Path("usr") / "lib" / "modules" / SID_RELEASE

    def binary(root: Path) -> None:
        (root / moddir).mkdir(parents=True)
        fake_bzimage(root / moddir / "vmlinuz", f"{SID_RELEASE} (debian) #1")

    def modules(root: Path) -> None:
        (root / moddir / "kernel" / "net").mkdir(parents=True)

    def base(root: Path) -> None:
        (root / moddir).mkdir(parents=True)
        (root / moddir / "modules.builtin").write_text("kernel/net/core/bpf_sk_storage.ko\n")
        (root / moddir / "modules.order").write_text("")

    parts = {"binary": binary, "modules": modules, "base": base}
    archive = {f"linux-image-{SID_RELEASE}": (
        fake_deb(tmp_path, f"linux-image-{SID_RELEASE}", lambda root: None), SID_7_2_DEPENDS)}
    for part, tree in parts.items():
        name = f"linux-{part}-{SID_RELEASE}"
        archive[name] = (fake_deb(tmp_path, name, tree), "")
    archive["linux-image-amd64"] = (
        None, f"linux-base-amd64 (= 7.2.13-1), linux-image-{SID_RELEASE} (= 7.2.13-1)")
    return archive


@pytest.mark.skipif(not (shutil.which("dpkg-deb") and find_tool("depmod")),
                    reason="needs dpkg-deb and depmod")
def test_a_split_sid_kernel_is_fetched_part_by_part(tmp_path, monkeypatch):
    archive = split_kernel_archive(tmp_path)
    fetched = []

    def package_field(cache, channel, package, field):
        if package not in archive:
            return None
        return {"Version": "7.2.13-1", "Depends": archive[package][1]}.get(field)

    def download(cache, channel, package, dest):
        fetched.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(archive[package][0], dest))

    monkeypatch.setattr(prebuilt.debian_archive, "refresh_lists", lambda *a, **k: None)
    monkeypatch.setattr(prebuilt.debian_archive, "package_field", package_field)
    monkeypatch.setattr(prebuilt.debian_archive, "download", download)
    cache = Cache(tmp_path / "cache")
    lines: list = []
    kernel = prebuilt.fetch_distro_kernel("7.2", cache, log=lines.append)

    target = cache.distro_kernels / f"linux-image-{SID_RELEASE}_7.2.13-1"
    assert kernel.release == SID_RELEASE
    assert kernel.image == target / "usr" / "lib" / "modules" / SID_RELEASE / "vmlinuz"
    assert kernel.modules_dir == target / "usr" / "lib" / "modules" / SID_RELEASE
    assert kernel.origin == f"Debian sid linux-image-{SID_RELEASE} 7.2.13-1"
    assert fetched == [f"linux-image-{SID_RELEASE}", f"linux-base-{SID_RELEASE}",
                       f"linux-binary-{SID_RELEASE}", f"linux-modules-{SID_RELEASE}"]
    assert (kernel.modules_dir / "modules.dep").exists()  # depmod ran on the merged tree
    assert (kernel.modules_dir / "modules.builtin").exists()
    assert len((target / ".complete").read_text().splitlines()) == 4
    assert not list(cache.downloads.iterdir())
    assert any("is split; fetching" in line for line in lines)

    # The second time the extracted tree is used as it is.
    fetched.clear()
    again = prebuilt.fetch_distro_kernel("7.2", cache, log=lines.append)
    assert again == kernel and fetched == []


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_a_tree_marked_complete_without_a_kernel_is_fetched_again(tmp_path, monkeypatch):
    archive = split_kernel_archive(tmp_path)
    cache = Cache(tmp_path / "cache")
    # What the runner before split packages left behind: the empty package, "complete".
    stale = cache.distro_kernels / f"linux-image-{SID_RELEASE}_7.2.13-1"
    extracted_tree(stale, "empty", SID_RELEASE)
    (stale / ".complete").write_text("x.deb\n")
    monkeypatch.setattr(prebuilt.debian_archive, "refresh_lists", lambda *a, **k: None)
    monkeypatch.setattr(prebuilt.debian_archive, "package_field",
                        lambda c, ch, package, field: {"Version": "7.2.13-1",
                                                       "Depends": archive[package][1]}.get(field))
    monkeypatch.setattr(prebuilt.debian_archive, "download",
                        lambda c, ch, package, dest: (dest.mkdir(parents=True, exist_ok=True),
                                                      Path(shutil.copy(archive[package][0],
                                                                       dest)))[1])
    monkeypatch.setattr(prebuilt, "_depmod", lambda moddir, release: None)
    kernel = prebuilt.fetch_distro_kernel("7.2", cache, log=lambda line: None)
    assert kernel.image == stale / "usr" / "lib" / "modules" / SID_RELEASE / "vmlinuz"


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_a_part_whose_version_lags_the_image_is_an_infrastructure_error(tmp_path, monkeypatch):
    archive = split_kernel_archive(tmp_path)

    def package_field(cache, channel, package, field):
        if field == "Version":
            return "7.2.12-1" if package.startswith("linux-modules-") else "7.2.13-1"
        return archive[package][1] if field == "Depends" else None

    monkeypatch.setattr(prebuilt.debian_archive, "refresh_lists", lambda *a, **k: None)
    monkeypatch.setattr(prebuilt.debian_archive, "package_field", package_field)
    monkeypatch.setattr(prebuilt.debian_archive, "download",
                        lambda c, ch, package, dest: (dest.mkdir(parents=True, exist_ok=True),
                                                      Path(shutil.copy(archive[package][0],
                                                                       dest)))[1])
    cache = Cache(tmp_path / "cache")
    with pytest.raises(InfrastructureError, match="needs linux-modules-.* 7.2.13-1, but .* 7.2.12-1"):
        prebuilt.fetch_distro_kernel("7.2", cache, log=lambda line: None)
    assert not (cache.distro_kernels / f"linux-image-{SID_RELEASE}_7.2.13-1").exists()


# --- a suite that left the archive ----------------------------------------------------------

# What apt-get update prints when deb.debian.org no longer carries a suite (HTTP 404 on
# its Release file), as when bullseye moved to archive.debian.org.
APT_404 = """\
Err:1 http://deb.debian.org/debian {suite} Release
  404  Not Found [IP: 151.101.2.132 80]
Reading package lists...
E: The repository 'http://deb.debian.org/debian {suite} Release' does not have a Release file.
N: Updating from such a repository can't be done securely, and is therefore disabled by default.
"""
APT_OFFLINE = """\
Err:1 http://deb.debian.org/debian {suite} InRelease
  Temporary failure resolving 'deb.debian.org'
W: Failed to fetch http://deb.debian.org/debian/dists/{suite}/InRelease  Temporary failure resolving 'deb.debian.org'
"""


def fake_apt_get(tmp_path: Path, monkeypatch, output: str, status: int) -> None:
    """An apt-get first on PATH that prints `output` and exits with `status`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "out.txt").write_text(output)
    script = bin_dir / "apt-get"
    script.write_text(f"#!/bin/sh\ncat {bin_dir / 'out.txt'}\nexit {status}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.skipif(not debian_archive.DEBIAN_KEYRING.exists(), reason="no Debian keyring")
def test_a_distro_version_no_longer_published_is_a_one_line_usage_error(tmp_path, monkeypatch):
    fake_apt_get(tmp_path, monkeypatch, APT_404.format(suite="bullseye"), 100)
    with pytest.raises(UsageError) as caught:
        prebuilt.fetch_distro_kernel("5.10", Cache(tmp_path / "cache"), log=lambda line: None)
    error = caught.value
    assert error.exit_code == ExitCode.USAGE and "\n" not in error.message
    assert error.message.startswith("--distro-kernel 5.10: Debian bullseye is no longer "
                                    "published on http://deb.debian.org/debian")
    assert "pick another --distro-kernel (6.1, 6.12, 7.2)" in error.message


@pytest.mark.skipif(not debian_archive.DEBIAN_KEYRING.exists(), reason="no Debian keyring")
def test_a_network_failure_is_not_mistaken_for_an_unpublished_suite(tmp_path, monkeypatch):
    fake_apt_get(tmp_path, monkeypatch, APT_OFFLINE.format(suite="bullseye"), 100)
    with pytest.raises(InfrastructureError, match="check the network"):
        prebuilt.fetch_distro_kernel("5.10", Cache(tmp_path / "cache"), log=lambda line: None)


def test_only_the_channels_own_suite_counts_as_unpublished():
    channel = debian_archive.suite_channel("bookworm", with_security=True)
    assert debian_archive.unpublished_suite(channel, APT_404.format(suite="bookworm")) == \
        "bookworm"
    assert debian_archive.unpublished_suite(channel, APT_404.format(suite="bullseye")) is None
    newer_apt = ("E: The repository 'http://deb.debian.org/debian bookworm Release' no longer "
                 "has a Release file.\n")
    assert debian_archive.unpublished_suite(channel, newer_apt) == "bookworm"

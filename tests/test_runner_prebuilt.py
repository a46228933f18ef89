"""Prebuilt kernels: boot-image validation, module staging, Debian package selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner import prebuilt
from runner.cache import Cache, default_cache_dir
from runner.errors import ExitCode, UsageError


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

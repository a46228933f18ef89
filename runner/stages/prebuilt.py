"""Stage 4 (alternative), a prebuilt kernel: --kernel-image [--modules] or a Debian distro kernel.

Nothing is installed system-wide: distro kernels are extracted with
`dpkg-deb -x` into the cache, and a small staging directory presents image
and modules in the layout virtme-ng expects (<root>/boot/vmlinuz-R next to
<root>/lib/modules/R), so it finds and loads the modules by itself.  An
extracted Debian tree already has such a layout: boot/vmlinuz-R beside
(usr/)lib/modules/R up to 6.12, usr/lib/modules/R/vmlinuz from sid's split
7.x packages on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner.cache import Cache
from runner.errors import InfrastructureError, UsageError
from runner.preflight import find_tool
from runner.stages import debian_archive

# Which Debian suite ships which kernel series as its linux-image-amd64.
DISTRO_SUITES = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie", "7.2": "sid"}


@dataclass(frozen=True)
class PrebuiltKernel:
    """A bootable image, its module directory (if any) and where it came from."""

    image: Path
    modules_dir: Path | None
    release: str | None
    origin: str


def read_boot_header(path: Path) -> str | None:
    """The release string an x86 boot image declares, '' if it declares none, None if not one.

    An x86 bzImage/vmlinuz carries the 0xAA55 boot flag at 0x1FE and the
    "HdrS" magic at 0x202; the kernel_version field at 0x20E points (minus
    0x200) at a NUL-terminated version string.
    """
    try:
        with open(path, "rb") as image:
            head = image.read(0x4000)
            if len(head) < 0x210 or head[0x1FE:0x200] != b"\x55\xaa" or head[0x202:0x206] != b"HdrS":
                return None
            offset = int.from_bytes(head[0x20E:0x210], "little")
            if not offset:
                return ""
            image.seek(offset + 0x200)
            text = image.read(256).split(b"\0", 1)[0].decode("ascii", "replace")
    except OSError:
        return None
    return text.split(" ", 1)[0] if text else ""


def open_kernel_image(
    image: Path, modules: Path | None, cache: Cache
) -> PrebuiltKernel:
    """Validate --kernel-image/--modules and stage them where virtme-ng finds both."""
    image = Path(image).expanduser()
    if not image.is_file():
        raise UsageError(f"--kernel-image {image}: no such file")
    release = read_boot_header(image)
    if release is None:
        raise UsageError(
            f"--kernel-image {image} is not an x86 kernel image (no bzImage boot header); "
            "pass arch/x86/boot/bzImage or a /boot/vmlinuz-* file"
        )
    modules_dir = None
    if modules is not None:
        modules_dir = Path(modules).expanduser().resolve()
        if not modules_dir.is_dir():
            raise UsageError(f"--modules {modules}: no such directory")
        nested = modules_dir / "lib" / "modules" / (release or "")
        if release and nested.is_dir():
            modules_dir = nested
        if not any((modules_dir / n).exists() for n in ("kernel", "modules.order", "modules.dep")):
            raise UsageError(
                f"--modules {modules} does not look like a lib/modules/<release> directory "
                "(no kernel/, modules.order or modules.dep); pass the directory "
                "`make modules_install INSTALL_MOD_PATH=X` made under X/lib/modules"
            )
    staged = _stage(cache, image.resolve(), modules_dir, release or "unknown")
    return PrebuiltKernel(staged, modules_dir, release or None, f"image {image.resolve()}")


def _stage(cache: Cache, image: Path, modules_dir: Path | None, release: str) -> Path:
    key = hashlib.sha256(f"{image}\0{modules_dir}".encode()).hexdigest()[:16]
    root = cache.root / "staged-kernels" / key
    boot = root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    link = boot / f"vmlinuz-{release}"
    _replace_symlink(link, image)
    module_link = root / "lib" / "modules" / release
    if modules_dir is not None:
        module_link.parent.mkdir(parents=True, exist_ok=True)
        _replace_symlink(module_link, modules_dir)
    elif module_link.is_symlink():
        module_link.unlink()
    return link


def _replace_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == str(target):
            return
        link.unlink()
    os.symlink(target, link)


def distro_package_name(depends: str, version: str) -> str | None:
    """The versioned linux-image package in linux-image-amd64's Depends, if it is `version`."""
    for alternative in depends.replace("|", ",").split(","):
        name = alternative.strip().split(" ", 1)[0]
        if name.startswith((f"linux-image-{version}.", f"linux-image-{version}-")):
            return name
    return None


def split_packages(image_package: str, depends: str) -> list[tuple[str, str | None]]:
    """The same-release packages an (empty) linux-image package depends on, with their `=` version.

    From sid's 7.x on, linux-image-R holds neither image nor modules: it depends on
    linux-binary-R (usr/lib/modules/R/vmlinuz), linux-modules-R and linux-base-R
    (modules.builtin and friends, which depmod reads).  Alternatives like
    `dracut | initramfs-tools` belong to the installed system, not to the kernel.
    """
    release = image_package.removeprefix("linux-image-")
    found: list[tuple[str, str | None]] = []
    for group in depends.split(","):
        for alternative in group.split("|"):
            words = alternative.strip().split(" ", 1)
            name = words[0]
            if (name == image_package or not name.startswith("linux-")
                    or not name.endswith(f"-{release}")):
                continue
            version = None
            if len(words) > 1 and words[1].strip().startswith("(="):
                version = words[1].strip()[2:].rstrip(")").strip()
            if name not in (n for n, _ in found):
                found.append((name, version))
    return found


@dataclass(frozen=True)
class KernelLayout:
    """Where an extracted kernel package tree keeps its image and modules."""

    image: Path
    release: str
    modules_dir: Path | None


def find_kernel_layout(root: Path) -> KernelLayout | None:
    """The kernel in an extracted tree: boot/vmlinuz-R, else (usr/)lib/modules/R/vmlinuz."""
    candidates = [(image, image.name[len("vmlinuz-"):])
                  for image in sorted((root / "boot").glob("vmlinuz-*"))]
    for base in (root / "usr" / "lib" / "modules", root / "lib" / "modules"):
        candidates += [(image, image.parent.name) for image in sorted(base.glob("*/vmlinuz"))]
    for image, release in candidates:
        if image.is_file() and release:
            return KernelLayout(image, release, _modules_dir(root, release))
    return None


def fetch_distro_kernel(
    version: str, cache: Cache, log: Callable[[str], None] = print
) -> PrebuiltKernel:
    """--distro-kernel V: Debian's linux-image for V, downloaded and extracted into the cache."""
    if version not in DISTRO_SUITES:
        raise UsageError(
            f"--distro-kernel {version}: unknown; choose one of {', '.join(DISTRO_SUITES)}"
        )
    suite = DISTRO_SUITES[version]
    channel = debian_archive.suite_channel(suite)
    try:
        debian_archive.refresh_lists(cache, channel, log=log)
    except debian_archive.SuiteNotPublished as gone:
        others = ", ".join(v for v in DISTRO_SUITES if v != version)
        raise UsageError(
            f"--distro-kernel {version}: {gone.message} (it left the main archive); "
            f"pick another --distro-kernel ({others}) or boot a saved image with --kernel-image"
        ) from None
    depends = debian_archive.package_field(cache, channel, "linux-image-amd64", "Depends") or ""
    package = distro_package_name(depends, version)
    if package is None:
        raise UsageError(
            f"--distro-kernel {version}: Debian {suite} no longer ships a {version} kernel "
            f"(linux-image-amd64 depends on {depends or 'nothing'}); pick another "
            "--distro-kernel"
        )
    pkg_version = debian_archive.package_field(cache, channel, package, "Version")
    target = cache.distro_kernels / f"{package}_{pkg_version}"
    layout = find_kernel_layout(target) if (target / ".complete").exists() else None
    if layout is None:
        # Also redoes a tree an older runner marked complete without a kernel in it.
        log(f"distro kernel: fetching {package} {pkg_version} from Debian {suite}")
        _fetch_and_extract(package, cache, channel, target, log)
        layout = find_kernel_layout(target)
        if layout is None:
            raise InfrastructureError(
                f"{package} has no boot/vmlinuz-* or usr/lib/modules/*/vmlinuz; remove "
                f"{target} and retry")
    return PrebuiltKernel(layout.image, layout.modules_dir, layout.release,
                          f"Debian {suite} {package} {pkg_version}")


def _modules_dir(root: Path, release: str) -> Path | None:
    for candidate in (root / "lib" / "modules" / release, root / "usr" / "lib" / "modules" / release):
        if candidate.is_dir():
            return candidate
    return None


def _fetch_and_extract(package: str, cache: Cache, channel: debian_archive.AptChannel,
                       target: Path, log: Callable[[str], None]) -> None:
    """Download and dpkg-deb -x the image package (and, when split, its parts) into a temp
    dir, generate modules.dep, then move the tree into place atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    debs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        debs.append(debian_archive.download(cache, channel, package, cache.downloads))
        _dpkg_extract(debs[-1], root)
        if not list((root / "boot").glob("vmlinuz-*")):
            depends = debian_archive.package_field(cache, channel, package, "Depends") or ""
            parts = split_packages(package, depends)
            if not parts:
                raise InfrastructureError(
                    f"{package} has no boot/vmlinuz-* and depends on no package of its "
                    f"release (Depends: {depends or 'nothing'})")
            log(f"distro kernel: {package} is split; fetching {', '.join(n for n, _ in parts)}")
            for name, wanted in parts:
                have = debian_archive.package_field(cache, channel, name, "Version")
                if wanted is not None and have != wanted:
                    raise InfrastructureError(
                        f"{package} needs {name} {wanted}, but Debian {channel.name}'s index "
                        f"has {have or 'none'} (a mirror mid-update?); retry later")
                debs.append(debian_archive.download(cache, channel, name, cache.downloads))
                _dpkg_extract(debs[-1], root)
        layout = find_kernel_layout(root)
        if layout is not None and layout.modules_dir is not None:
            _depmod(layout.modules_dir, layout.release)
        (root / ".complete").write_text("".join(f"{deb.name}\n" for deb in debs))
        if target.exists():
            shutil.rmtree(target)
        os.rename(root, target)
    for deb in debs:
        deb.unlink(missing_ok=True)


def _dpkg_extract(deb: Path, root: Path) -> None:
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)],
                          stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise InfrastructureError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()[-200:]}")


def _depmod(moddir: Path, release: str) -> None:
    """Debian generates modules.dep in postinst; do it here since nothing is installed."""
    depmod = find_tool("depmod")
    if depmod is None:
        raise UsageError("depmod not found; install it with: apt-get install kmod")
    with tempfile.TemporaryDirectory(prefix="depmod-") as base:
        # depmod -b looks in <base>/lib/modules or <base>/usr/lib/modules depending
        # on how kmod was built; expose the real dir under both.
        (Path(base) / "usr" / "lib" / "modules").mkdir(parents=True)
        os.symlink(moddir, Path(base) / "usr" / "lib" / "modules" / release)
        os.symlink("usr/lib", Path(base) / "lib")
        proc = subprocess.run([depmod, "-a", "-b", base, release], stderr=subprocess.PIPE,
                              text=True, check=False)
    if proc.returncode != 0:
        raise InfrastructureError(f"depmod for {release} failed: {proc.stderr.strip()[-200:]}")

"""What a remote run pushes: the suite, and the runner's own pure-Python pytest when the target lacks one.

The bundle is one tar.gz, so a slow link pays one SFTP transfer instead of a
round trip per file.  The pushed packages travel inside it as one zip that
Python imports from directly (zipimport): unpacking hundreds of files costs
more than the whole transfer on a slow target, such as a TCG guest.  pytest's dependencies are worked out for the target's
Python, not the runner's (exceptiongroup and tomli are needed below 3.11 only),
from the distributions installed beside the runner; a dependency the runner's
environment lacks, a Requires-Python the target does not meet, or compiled code
is refused with what to install instead.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from runner.errors import UsageError

SITE_ZIP = "site-packages.zip"  # runner.guest.remote_driver.SITE_ZIP: what the driver puts on PYTHONPATH
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}
COMPILED_SUFFIXES = (".so", ".pyd", ".dylib")
INSTALL_HINT = "install pytest on the target (python3 -m pip install pytest, or apt install " \
               "python3-pytest)"


def pytest_closure(environment: Mapping[str, str]) -> list[metadata.Distribution]:
    """pytest and everything it requires on a Python described by `environment` (PEP 508 names)."""
    python = environment["python_full_version"]
    wanted, seen, found = ["pytest"], set(), []
    while wanted:
        name = canonicalize_name(wanted.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise UsageError(f"the target's Python {python} needs {name} for pytest and the "
                             f"runner's environment has none to push; {INSTALL_HINT}, or "
                             f"pip install {name} beside the runner") from None
        # An email.message.Message at run time; typeshed's PackageMetadata protocol lacks get().
        requires_python = dist.metadata.get("Requires-Python")  # type: ignore[attr-defined]
        if requires_python and not SpecifierSet(requires_python).contains(python,
                                                                          prereleases=True):
            raise UsageError(f"the runner's {dist.metadata['Name']} {dist.version} needs Python "
                             f"{requires_python} but the target has {python}; {INSTALL_HINT}")
        found.append(dist)
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or _applies(requirement.marker, environment):
                wanted.append(requirement.name)
    return found


def _applies(marker: Marker, environment: Mapping[str, str]) -> bool:
    # extra="" leaves out optional extras (pytest[dev]).
    return marker.evaluate(dict(environment, extra=""))


def distribution_files(dist: metadata.Distribution) -> Iterator[tuple[Path, str]]:
    """(installed file, path inside site-packages) for a pure-Python distribution."""
    name = dist.metadata["Name"]
    if dist.files is None:
        raise UsageError(f"the runner's {name} has no file list (RECORD) to push; {INSTALL_HINT}")
    for entry in dist.files:
        parts = Path(str(entry)).parts
        # Console scripts live outside site-packages ("../../bin/pytest"); bytecode is rebuilt.
        if ".." in parts or SKIPPED_DIRS.intersection(parts) or entry.suffix == ".pyc":
            continue
        if entry.suffix in COMPILED_SUFFIXES:
            raise UsageError(f"the runner's {name} contains compiled code ({entry}) that may not "
                             f"run on the target; {INSTALL_HINT}")
        local = Path(str(dist.locate_file(entry)))
        if local.is_file():
            yield local, "/".join(parts)


def suite_files(suite: Path) -> Iterator[tuple[Path, str]]:
    """(file, path relative to the suite) for everything in the suite except caches."""
    for path in sorted(Path(suite).rglob("*")):
        relative = path.relative_to(suite)
        if SKIPPED_DIRS.intersection(relative.parts) or path.suffix == ".pyc":
            continue
        if path.is_file():
            yield path, relative.as_posix()


def site_zip(dists: list[metadata.Distribution]) -> bytes:
    """The distributions' files as an importable zip (packages and their .dist-info)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for dist in dists:
            for path, relative in distribution_files(dist):
                archive.write(path, relative)
    return buffer.getvalue()


def build_bundle(suite: Path, dists: list[metadata.Distribution]) -> bytes:
    """The tar.gz the driver unpacks: SUITE_NAME/... and, with dists, site-packages.zip."""
    suite = Path(suite)
    buffer = io.BytesIO()
    # dereference: a symlinked test file travels as the file (the driver refuses links).
    with tarfile.open(fileobj=buffer, mode="w:gz", dereference=True) as archive:
        for path, relative in suite_files(suite):
            archive.add(str(path), arcname=f"{suite.name}/{relative}", recursive=False,
                        filter=_plain)
        if dists:
            data = site_zip(dists)
            info = _plain(tarfile.TarInfo(SITE_ZIP))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The driver extracts as root: no host uids or odd modes should come along.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    return info

"""The guest's import bundle: what starting pytest on the suite imports, compiled into one file.

Starting pytest in a TCG guest spent most of its time walking the 9p root for
about 280 modules (pytest, the standard library, bpfkit); runner/guest/import_bundle.py
serves them from one file instead.  This side decides what goes in (the
modules a host-side collection of the suite imports, minus the test modules and
conftest files that pytest rewrites) and keeps the bundle current: it is rebuilt
whenever the interpreter, a file of the suite or a bundled module changes, judged
by size and mtime, so a guest never runs code older than the tree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import atomic_file
from runner.guest import import_bundle

BOOTSTRAP = Path(import_bundle.__file__).resolve()
LIST_TIMEOUT = 300.0

# Runs on the host with the guest's interpreter: collect the suite, then list every
# module imported from a .py file that pytest did not rewrite.
_LIST_MODULES = r"""
import json, sys
import pytest

suite, out = sys.argv[1], sys.argv[2]

class Recorder:
    def pytest_collection_finish(self, session):
        found = {}
        for name, module in list(sys.modules.items()):
            filename = getattr(module, "__file__", None) or ""
            spec = getattr(module, "__spec__", None)
            if not filename.endswith(".py") or spec is None:
                continue
            if type(spec.loader).__name__ == "AssertionRewritingHook":
                continue
            found[name] = [filename, hasattr(module, "__path__")]
        with open(out, "w") as listing:
            json.dump(found, listing)

pytest.main([suite, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[Recorder()])
"""


@dataclass(frozen=True)
class GuestBundle:
    """A bundle file and how the guest starts a module with it."""

    path: Path
    modules: int

    def launcher(self, python: str) -> list[str]:
        """argv up to the module name, in place of `python -m`."""
        return [python, "-S", str(BOOTSTRAP), str(self.path), os.pathsep.join(site_dirs()), "-m"]


def site_dirs() -> list[str]:
    """The interpreter's site-packages directories, which -S would otherwise drop."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]


def _stat_key(path: Path) -> list:
    status = path.stat()
    return [str(path), status.st_size, status.st_mtime_ns]


def suite_key(python: str, suite_dir: Path) -> str:
    """What decides the module list: the interpreter and every Python file of the suite."""
    digest = hashlib.sha256(f"{python}\0{sys.version}\0{import_bundle.FORMAT}".encode())
    digest.update(importlib.util.MAGIC_NUMBER)
    for path in sorted(suite_dir.rglob("*.py")):
        if "__pycache__" not in path.parts:
            digest.update(json.dumps(_stat_key(path)).encode())
    return digest.hexdigest()


def list_modules(python: str, suite_dir: Path, scratch: Path) -> dict[str, tuple[str, bool]]:
    """Module name -> (file, is a package), from a collection of the suite on this host."""
    listing = scratch / "modules.json"
    listing.unlink(missing_ok=True)
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1")
    subprocess.run([python, "-c", _LIST_MODULES, str(suite_dir), str(listing)], cwd=suite_dir,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=LIST_TIMEOUT, check=False)
    if not listing.exists():
        raise RuntimeError(f"collecting {suite_dir} on the host listed no modules")
    return {name: (filename, is_package)
            for name, (filename, is_package) in json.loads(listing.read_text()).items()}


def _current(manifest: Path, key: str) -> dict | None:
    """The manifest of a bundle made for `key` whose module files are all unchanged."""
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("key") != key:
        return None
    try:
        if any(_stat_key(Path(entry[0])) != entry for entry in recorded["files"]):
            return None
    except OSError:
        return None
    return recorded


def ensure(directory: Path, python: str, suite_dir: Path,
           log: Callable[[str], None] = print) -> GuestBundle:
    """The current bundle for this interpreter and suite, built when anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    key = suite_key(python, suite_dir)
    # One bundle per checkout and interpreter, rebuilt in place: the cache stays small.
    name = hashlib.sha256(f"{python}\0{suite_dir}".encode()).hexdigest()[:16]
    bundle, manifest = directory / f"{name}.bundle", directory / f"{name}.json"
    recorded = _current(manifest, key)
    if recorded is not None and bundle.exists():
        return GuestBundle(bundle, recorded["modules"])
    found = list_modules(python, suite_dir, directory)
    modules, files = {}, []
    for module_name, (filename, is_package) in sorted(found.items()):
        path = Path(filename)
        try:
            source = path.read_bytes()
            code = compile(source, filename, "exec", dont_inherit=True)
            files.append(_stat_key(path))
        except (OSError, SyntaxError, ValueError):
            continue  # imported from disk in the guest, as without a bundle
        modules[module_name] = (is_package, filename, marshal.dumps(code))
    content = {"format": import_bundle.FORMAT, "magic": importlib.util.MAGIC_NUMBER,
               "modules": modules}
    atomic_file.write_bytes(bundle, marshal.dumps(content))
    atomic_file.write_text(manifest, json.dumps({"key": key, "modules": len(modules),
                                                 "files": files}))
    log(f"guest bundle: {len(modules)} modules for the guest's start-up in {bundle}")
    return GuestBundle(bundle, len(modules))


def launcher_or_plain(directory: Path | None, python: str, suite_dir: Path,
                      log: Callable[[str], None]) -> Sequence[str]:
    """The guest's way to start a module: through a bundle, or plainly when none can be made.

    A bundle only saves time, so failing to make one is reported and the run goes on.
    """
    if directory is None:
        return [python, "-m"]
    try:
        return ensure(directory, python, suite_dir, log).launcher(python)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log(f"guest bundle: none this run ({error}); the guest imports from disk")
        return [python, "-m"]

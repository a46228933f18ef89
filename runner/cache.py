"""Where downloaded sources, distro kernels, build directories and ccache live.

One directory holds everything that is expensive to recreate, so CI can save
and restore it as a unit and a user can delete it to start over.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UsageError

APP_NAME = "sk-storage-selftests"
# Lets CI and the project's own boot test share one cache without repeating
# --cache-dir on every command line.
CACHE_DIR_ENV = "SK_STORAGE_SELFTESTS_CACHE_DIR"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The cache used without --cache-dir: $SK_STORAGE_SELFTESTS_CACHE_DIR, else XDG."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_DIR_ENV):
        return Path(env[CACHE_DIR_ENV]).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(env.get("HOME", "~")).expanduser() / ".cache"
    return base / APP_NAME


@dataclass(frozen=True)
class Cache:
    """Named subdirectories of the cache root; paths only, nothing is created here."""

    root: Path

    @property
    def sources(self) -> Path:
        """Unpacked kernel sources (the default Debian tree and its stamp)."""
        return self.root / "sources"

    @property
    def downloads(self) -> Path:
        """Downloaded .deb files."""
        return self.root / "downloads"

    @property
    def apt(self) -> Path:
        """Private apt state per Debian suite."""
        return self.root / "apt"

    @property
    def distro_kernels(self) -> Path:
        """Extracted Debian linux-image packages."""
        return self.root / "distro-kernels"

    @property
    def builds(self) -> Path:
        """Keyed build directories."""
        return self.root / "build"

    @property
    def worktrees(self) -> Path:
        """git worktrees made for --base."""
        return self.root / "worktrees"

    @property
    def kvm_verdict(self) -> Path:
        """A failed KVM probe, remembered so `--accel auto` does not repeat it (runner.stages.accel)."""
        return self.root / "kvm-verdict.json"

    @property
    def guest_pycache(self) -> Path:
        """Bytecode the guest's Python writes (PYTHONPYCACHEPREFIX), kept across runs."""
        return self.root / "guest-pycache"

    @property
    def guest_bundles(self) -> Path:
        """Import bundles for the guest's start-up (stages/guest_bundle.py), one per checkout."""
        return self.root / "guest-bundles"

    @property
    def ccache(self) -> Path:
        """ccache directory shared by every build directory."""
        return self.root / "ccache"


def open_cache(path: Path | None) -> Cache:
    """Create (if needed) and check the cache root; unwritable is a usage error."""
    root = Path(path).expanduser() if path else default_cache_dir()
    root = root.absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create cache directory {root}: {exc.strerror}; "
            "pass --cache-dir DIR pointing to a writable place"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(
            f"cache directory {root} is not writable; pass --cache-dir DIR pointing to a "
            "writable place"
        )
    return Cache(root)

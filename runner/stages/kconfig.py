"""Stage 3, the kernel config: virtme-ng's minimal config plus fragments, checked after olddefconfig.

Fragments are data (symbol -> value).  After `virtme-configkernel --defconfig`
merges them and runs olddefconfig, every requested symbol that did not get
its requested value is listed (unmet dependency, typo, virtme override).
The build directory's .config is only rewritten when the result changed, and
regeneration is skipped when none of its inputs changed, so an unchanged
tree rebuilds incrementally.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.errors import BuildError, ConfigError, UsageError
from runner.preflight import find_tool

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


@dataclass(frozen=True)
class Setting:
    """One requested value and where it was asked for (for error messages)."""

    symbol: str
    value: str
    origin: str


@dataclass(frozen=True)
class Fragment:
    """A config fragment file as data."""

    path: Path
    settings: tuple[Setting, ...]


def parse_config(text: str) -> dict[str, str]:
    """Symbol -> value of a .config (or fragment); '# CONFIG_X is not set' reads as 'n'."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = _SET.match(line)
        if match:
            values[match.group(1)] = match.group(2)
            continue
        match = _UNSET.match(line)
        if match:
            values[match.group(1)] = "n"
    return values


def load_fragment(path: Path) -> Fragment:
    """Parse a fragment file; a line that is not an assignment or a comment is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"config fragment {path} does not exist; check --config")
    settings = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        origin = f"{path}:{number}"
        match = _SET.match(line)
        if match:
            settings.append(Setting(match.group(1), match.group(2), origin))
        elif _UNSET.match(line):
            settings.append(Setting(_UNSET.match(line).group(1), "n", origin))
        elif line and not line.startswith("#"):
            raise UsageError(
                f"{origin}: {line!r} is not a config line; write CONFIG_FOO=y or "
                "'# CONFIG_FOO is not set'"
            )
    return Fragment(path.resolve(), tuple(settings))


def requested_settings(fragments: Sequence[Fragment]) -> dict[str, Setting]:
    """What the fragments ask for, later fragments overriding earlier ones like a merge does."""
    requested: dict[str, Setting] = {}
    for fragment in fragments:
        for setting in fragment.settings:
            requested[setting.symbol] = setting
    return requested


def unmet_settings(
    requested: Mapping[str, Setting], actual: Mapping[str, str]
) -> list[tuple[Setting, str]]:
    """Requested settings the final config does not have, with the value it has instead."""
    unmet = []
    for symbol, setting in requested.items():
        got = actual.get(symbol, "n")
        if got != setting.value:
            unmet.append((setting, got))
    return unmet


def describe_unmet(unmet: Sequence[tuple[Setting, str]]) -> ConfigError:
    """The error for settings that did not survive: one line, then one detail line each."""
    names = ", ".join(f"{s.symbol}={s.value}" for s, _ in unmet[:6])
    more = f" and {len(unmet) - 6} more" if len(unmet) > 6 else ""
    details = [
        f"{s.origin}: {s.symbol}={s.value} requested, final .config has "
        f"{'it unset' if got == 'n' else got} (unknown symbol, unmet dependency or override)"
        for s, got in unmet
    ]
    return ConfigError(
        f"{len(unmet)} requested config option(s) did not survive olddefconfig: {names}{more}; "
        "fix the fragment or the dependency",
        details=details,
    )


# --- generating the config ---------------------------------------------------------------


def kconfig_files_read(work_dir: Path) -> list[str] | None:
    """The Kconfig files (relative to the source) the last generation in work_dir read.

    Kbuild lists them as deps_config in include/config/auto.conf.cmd; None
    before the first generation.
    """
    try:
        text = (work_dir / "include" / "config" / "auto.conf.cmd").read_text(errors="replace")
    except OSError:
        return None
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("deps_config :="):
            break
    else:
        return None
    files = []
    for line in lines:
        name = line.strip().rstrip("\\").strip()
        if name:
            files.append(name)
        if not line.rstrip().endswith("\\"):
            break
    return files or None


def all_kconfig_files(source: Path) -> list[str]:
    """Every Kconfig* file of the tree: what a generation may read when no list exists yet."""
    found = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.relpath(os.path.join(dirpath, f), source)
                     for f in sorted(filenames) if f.startswith("Kconfig"))
    return found


def content_hashes(source: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each file (relative to source); "missing" for one that is not there."""
    hashes = {}
    for name in names:
        try:
            hashes[name] = hashlib.sha256((source / name).read_bytes()).hexdigest()
        except OSError:
            hashes[name] = "missing"
    return hashes


def config_inputs_digest(
    source: Path, fragments: Sequence[Fragment], tool_version: str,
    kconfigs: Mapping[str, str] | None = None,
) -> str:
    """Hash of everything the generated .config depends on: Kconfig files, defconfig, fragments.

    kconfigs (name -> content hash) defaults to every Kconfig file of the
    tree; given Kbuild's own list of the files a generation read, checking
    costs a few hundred reads instead of a walk of the whole tree.
    """
    if kconfigs is None:
        kconfigs = content_hashes(source, all_kconfig_files(source))
    digest = hashlib.sha256(tool_version.encode() + b"\0")
    for name in sorted(kconfigs):
        digest.update(f"{name}\0{kconfigs[name]}\n".encode("utf-8", "surrogateescape"))
    extra = ["Makefile", "arch/x86/configs/x86_64_defconfig"]
    for name, value in content_hashes(source, extra).items():
        digest.update(f"{name}\0{value}\n".encode())
    # Content, not where the fragment lives: a second checkout of the project
    # must not regenerate (and then flip-flop the stamp with the first).
    for fragment in fragments:
        digest.update(fragment.path.read_bytes() + b"\0")
    return digest.hexdigest()


def _virtme_version() -> str:
    try:
        from importlib.metadata import version

        return version("virtme-ng")
    except Exception:  # noqa: BLE001 - any failure just means "unknown", forcing regeneration
        return "unknown"


@dataclass(frozen=True)
class ConfigResult:
    """The build directory's .config and whether this run regenerated or rewrote it."""

    path: Path
    regenerated: bool
    rewritten: bool


def configure(
    source: Path, obj_dir: Path, work_dir: Path, fragments: Sequence[Fragment], log_file: Path,
) -> ConfigResult:
    """Produce <obj_dir>/.config from virtme-ng's defconfig plus fragments and verify it."""
    obj_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    final = obj_dir / ".config"
    stamp = work_dir / "inputs.sha256"
    version = _virtme_version()
    listed = kconfig_files_read(work_dir)
    read_before = content_hashes(source, listed if listed else all_kconfig_files(source))
    inputs = config_inputs_digest(source, fragments, version, read_before)
    regenerated = rewritten = False

    if not (final.exists() and stamp.exists() and stamp.read_text() == _stamp_text(inputs, final)):
        tool = find_tool("virtme-configkernel")
        if tool is None:
            raise UsageError("virtme-configkernel not found; install it with: pip install virtme-ng")
        generated = work_dir / ".config"
        if generated.exists():
            generated.unlink()
        command = [tool, "--defconfig"]
        for fragment in fragments:
            command += ["--custom", str(fragment.path)]
        command.append(f"O={work_dir}")
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(tool) + os.pathsep + env.get("PATH", "")
        with open(log_file, "w") as log:
            log.write("$ " + " ".join(command) + f"\n(in {source})\n")
            log.flush()
            proc = subprocess.run(command, cwd=source, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0 or not generated.exists():
            tail = log_file.read_text(errors="replace").splitlines()[-8:]
            raise BuildError(
                f"virtme-configkernel failed (exit {proc.returncode}); see {log_file}",
                details=tail,
            )
        regenerated = True
        if not final.exists() or final.read_bytes() != generated.read_bytes():
            # Only a real change touches .config: an identical rewrite would still
            # make Kbuild re-run syncconfig and relink.
            shutil.copyfile(generated, final)
            rewritten = True
        _write_stamp(stamp, source, fragments, version, work_dir, read_before, final)

    unmet = unmet_settings(requested_settings(fragments), parse_config(final.read_text()))
    if unmet:
        raise describe_unmet(unmet)
    return ConfigResult(final, regenerated, rewritten)


def _write_stamp(stamp: Path, source: Path, fragments: Sequence[Fragment], version: str,
                 work_dir: Path, read_before: Mapping[str, str], final: Path) -> None:
    """Record the inputs of this generation, keyed by the Kconfig files it actually read.

    Those files must be the ones hashed before it ran: a file edited while
    virtme-configkernel ran, or one first sourced by it, leaves no stamp, so
    the next run generates again rather than trusting a config of unknown inputs.
    """
    listed = kconfig_files_read(work_dir)
    if not listed:
        stamp.unlink(missing_ok=True)
        return
    now = content_hashes(source, listed)
    if any(read_before.get(name) != value for name, value in now.items()):
        stamp.unlink(missing_ok=True)
        return
    inputs = config_inputs_digest(source, fragments, version, now)
    stamp.write_text(_stamp_text(inputs, final))


def _stamp_text(inputs: str, final: Path) -> str:
    """Inputs hash plus the hash of the .config they produced (catches hand edits)."""
    config_hash = hashlib.sha256(final.read_bytes()).hexdigest() if final.exists() else "-"
    return f"{inputs} {config_hash}\n"


def config_needs_modules(config: Mapping[str, str]) -> bool:
    """True when the config builds anything as a module, so `make modules` is needed."""
    return config.get("CONFIG_MODULES") == "y" and any(v == "m" for v in config.values())

"""Known kernel bugs as data: which upstream fix, which tests, which kernels.

The registry (selftests/expectations/known_bugs.json) turns a known bug into a strict
expected failure on the kernels it affects, so a run on such a kernel is green while the
bug is there, red when the test starts passing (the entry is stale) and red on any
failure that is not this bug's. conftest.py applies it; this module only decides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import kernel

REGISTRY_FILE = Path(__file__).resolve().parent.parent / "expectations" / "known_bugs.json"

Version = tuple[int, int, int]


@dataclass(frozen=True)
class KnownBug:
    """One registry entry."""

    fix: str | None
    subject: str
    tests: tuple[str, ...]
    affected: tuple[tuple[Version, Version | None], ...]
    fails_with: str
    masked_by_heap_init: bool = False

    @property
    def fixed_by(self) -> str:
        """e.g. 'fixed upstream by 7cbd0c4cebe4 ("bpf: Fix ...")', or the subject when unfixed."""
        if self.fix is None:
            return self.subject
        return f'fixed upstream by {self.fix} ("{self.subject}")'

    def covers(self, nodeid: str) -> bool:
        """Whether a pytest node id (relative to selftests/, any parameters) is one of the tests."""
        bare = nodeid.split("[", 1)[0]
        return any(bare == test or bare.endswith("/" + test) for test in self.tests)

    def affects(self, identity: kernel.KernelIdentity, backports: frozenset[str],
                heap_init_on_alloc: bool | None) -> bool:
        """Whether the kernel has this bug: version in a range, no backport, not masked."""
        if self.fix is not None and any(_same_commit(self.fix, b) for b in backports):
            return False
        if self.masked_by_heap_init and heap_init_on_alloc:
            return False
        return any(low <= identity.version and (high is None or identity.version < high)
                   for low, high in self.affected)

    def explains(self, failure: str) -> bool:
        """Whether a failure's text (exception type and message) is this bug's."""
        return re.search(self.fails_with, failure) is not None


def _same_commit(a: str, b: str) -> bool:
    """Abbreviated commit ids name the same commit when one is a prefix of the other."""
    a, b = a.lower(), b.lower()
    return len(min(a, b, key=len)) >= 7 and (a.startswith(b) or b.startswith(a))


def parse_registry(text: str) -> list[KnownBug]:
    """Entries from the registry's JSON text; ValueError naming the entry when malformed."""
    bugs = []
    for index, entry in enumerate(json.loads(text)["bugs"]):
        try:
            ranges = tuple(
                (kernel.parse_version(low), None if high is None else kernel.parse_version(high))
                for low, high in entry["affected"])
            re.compile(entry["fails_with"])
            bug = KnownBug(entry["fix"], entry["subject"], tuple(entry["tests"]), ranges,
                           entry["fails_with"], bool(entry.get("masked_by_heap_init", False)))
        except (KeyError, TypeError, ValueError, re.error) as err:
            raise ValueError(f"{REGISTRY_FILE.name}: entry {index} is malformed: {err!r}") from None
        if not bug.tests or not bug.affected:
            raise ValueError(f"{REGISTRY_FILE.name}: entry {index} names no test or no range")
        bugs.append(bug)
    return bugs


def load_registry(path: Path = REGISTRY_FILE) -> list[KnownBug]:
    """The project's registry."""
    return parse_registry(path.read_text())


def bug_for(nodeid: str, bugs: list[KnownBug], identity: kernel.KernelIdentity,
            backports: frozenset[str], heap_init_on_alloc: bool | None) -> KnownBug | None:
    """The known bug that makes this test an expected failure on this kernel, if any."""
    for bug in bugs:
        if bug.covers(nodeid) and bug.affects(identity, backports, heap_init_on_alloc):
            return bug
    return None


def parse_backports(text: str | None) -> frozenset[str]:
    """'b5c111f4967b, 7cbd0c4cebe4' -> a set of commit ids (hex, at least 7 digits)."""
    if not text:
        return frozenset()
    ids = {part.strip().lower() for part in re.split(r"[,\s]+", text) if part.strip()}
    bad = sorted(i for i in ids if not re.fullmatch(r"[0-9a-f]{7,40}", i))
    if bad:
        raise ValueError(f"not commit ids: {', '.join(bad)}")
    return frozenset(ids)


def fixes_named_in(texts: list[str], bugs: list[KnownBug]) -> frozenset[str]:
    """The registry fixes whose commit id a patch text names: the patch carries the fix."""
    named = set()
    for bug in bugs:
        if bug.fix is not None and any(re.search(rf"\b{bug.fix}", text) for text in texts):
            named.add(bug.fix)
    return frozenset(named)

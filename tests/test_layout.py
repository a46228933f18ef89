"""The tree is the documentation: the README's tables name every runner module exactly once,
and what runs off-host imports only the standard library and the suite's bpfkit."""

from __future__ import annotations

import ast
import json
import re
import sys

from conftest import REPO

RUNNER = REPO / "runner"


def runner_modules() -> set[str]:
    """Every module of runner/, as the path the README uses (package __init__ files aside)."""
    return {str(p.relative_to(REPO)) for p in RUNNER.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}


def readme_section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_names_every_runner_module_once():
    section = readme_section("What a run does")
    stages = re.findall(r"^\| [^|]+ \| `(runner/stages/\w+\.py)` \|", section, re.MULTILINE)
    packages = re.findall(r"^\| `(runner/(?:\w+/)?)` \| ([^|]+) \|", section, re.MULTILINE)
    named = list(stages)
    for package, modules in packages:
        named += [f"{package}{name}.py" for name in re.findall(r"`(\w+)`", modules)]
    assert len(named) == len(set(named)), "a module is named twice"
    assert set(named) == runner_modules()
    # The stage table lists the stages package, and the package table the rest.
    assert {m for m in runner_modules() if m.startswith("runner/stages/")} == set(stages)


def test_guest_code_imports_only_the_standard_library_and_bpfkit():
    for path in (RUNNER / "guest").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "bpfkit", f"{path.name} imports {name}"


def test_the_readme_argues_every_equivalent_mutant():
    """The README's table of equivalent mutants is the catalogue's list, no more, no less."""
    section = readme_section("Does the suite see every change? `run-selftests mutants`")
    argued = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]{20,} \|$", section, re.MULTILINE)
    catalogue = json.loads((REPO / "kernel_patches" / "mutants" / "catalogue.json").read_text())
    assert sorted(argued) == sorted(e["id"] for e in catalogue if e.get("equivalent"))

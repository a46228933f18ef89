"""Config fragments as data and the survival check after olddefconfig, on a real .config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO, TESTS

from runner.errors import ConfigError, ExitCode, UsageError
from runner.stages import kconfig

FIXTURES = TESTS / "fixtures" / "runner"
REAL_CONFIG = (FIXTURES / "config-6.1-excerpt").read_text()


def fragment(tmp_path: Path, text: str, name: str = "frag.config") -> kconfig.Fragment:
    path = tmp_path / name
    path.write_text(text)
    return kconfig.load_fragment(path)


def test_parse_config_reads_values_and_not_set_lines():
    values = kconfig.parse_config(REAL_CONFIG)
    assert values["CONFIG_BPF_SYSCALL"] == "y"
    assert values["CONFIG_BPF_JIT_ALWAYS_ON"] == "n"
    assert values["CONFIG_CC_VERSION_TEXT"] == '"gcc (Debian 12.2.0-14+deb12u1) 12.2.0"'
    assert values["CONFIG_LOCALVERSION"] == '""'
    assert "CONFIG_KASAN" in values and values["CONFIG_KASAN"] == "n"


def test_the_projects_fragment_survives_on_the_real_config():
    frag = kconfig.load_fragment(REPO / "kconfig" / "sk-storage.config")
    assert any(s.symbol == "CONFIG_DEBUG_INFO_BTF" for s in frag.settings)
    unmet = kconfig.unmet_settings(kconfig.requested_settings([frag]),
                                   kconfig.parse_config(REAL_CONFIG))
    assert unmet == []


def test_unknown_symbol_and_lost_values_are_listed_with_their_origin(tmp_path):
    frag = fragment(tmp_path, "CONFIG_BPF_SYSCALL=y\nCONFIG_BPF_SYSCALLL=y\nCONFIG_BPF_JIT_ALWAYS_ON=y\n# CONFIG_INET_DIAG is not set\nCONFIG_MODULES=m" + "\n")
    unmet = kconfig.unmet_settings(kconfig.requested_settings([frag]),
                                   kconfig.parse_config(REAL_CONFIG))
    assert [(s.symbol, s.value, got) for s, got in unmet] == [
        ("CONFIG_BPF_SYSCALLL", "y", "n"),
        ("CONFIG_BPF_JIT_ALWAYS_ON", "y", "n"),
        ("CONFIG_INET_DIAG", "n", "y"),
        ("CONFIG_MODULES", "m", "y"),
    ]
    error = kconfig.describe_unmet(unmet)
    assert isinstance(error, ConfigError)
    assert error.exit_code == ExitCode.BUILD_FAILURE
    assert "\n" not in error.message
    assert error.message.startswith("4 requested config option(s) did not survive olddefconfig")
    assert "CONFIG_BPF_SYSCALLL=y" in error.message
    assert error.details[0] == (
        f"{frag.path}:2: CONFIG_BPF_SYSCALLL=y requested, final .config has it unset "
        "(unknown symbol, unmet dependency or override)")


def test_later_fragments_override_earlier_ones(tmp_path):
    first = fragment(tmp_path, "CONFIG_KASAN=y\nCONFIG_BPF=y\n", "a.config")
    second = fragment(tmp_path, "# CONFIG_KASAN is not set\n", "b.config")
    requested = kconfig.requested_settings([first, second])
    assert requested["CONFIG_KASAN"].value == "n"
    assert requested["CONFIG_KASAN"].origin.endswith("b.config:1")
    assert kconfig.unmet_settings(requested, kconfig.parse_config(REAL_CONFIG)) == []


def test_a_line_that_is_not_config_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as error:
        fragment(tmp_path, "CONFIG_BPF=y\nBPF_SYSCALL=y\n")
    assert error.value.exit_code == ExitCode.USAGE
    assert "frag.config:2" in error.value.message


def test_missing_fragment_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        kconfig.load_fragment(tmp_path / "nope.config")


def test_modules_are_built_only_when_something_is_a_module():
    values = kconfig.parse_config(REAL_CONFIG)
    assert not kconfig.config_needs_modules(values)  # the excerpt has no =m line
    assert kconfig.config_needs_modules(dict(values, CONFIG_EFIVAR_FS="m"))
    assert not kconfig.config_needs_modules({"CONFIG_MODULES": "n", "CONFIG_X": "m"})


def test_config_inputs_digest_follows_kconfig_files_and_fragments(tmp_path):
    tree = tmp_path / "linux"
    (tree / "net").mkdir(parents=True)
    (tree / "Kconfig").write_text("source \"net/Kconfig\"\n")
    (tree / "net" / "Kconfig").write_text("config NET\n\tbool\n")
    (tree / "Makefile").write_text("VERSION = 6\n")
    frag = fragment(tmp_path, "CONFIG_NET=y\n")
    first = kconfig.config_inputs_digest(tree, [frag], "1.42")
    assert kconfig.config_inputs_digest(tree, [frag], "1.42") == first
    (tree / "net" / "Kconfig").write_text("config NET\n\tbool \"Networking\"\n")
    second = kconfig.config_inputs_digest(tree, [frag], "1.42")
    assert second != first
    (tree / "net" / "foo.c").write_text("int x;\n")  # not a config input
    assert kconfig.config_inputs_digest(tree, [frag], "1.42") == second
    assert kconfig.config_inputs_digest(tree, [frag], "1.43") != second
    # The same fragment in another checkout is the same input.
    (tmp_path / "other").mkdir()
    elsewhere = fragment(tmp_path / "other", "CONFIG_NET=y\n")
    assert kconfig.config_inputs_digest(tree, [elsewhere], "1.42") == second
    changed = fragment(tmp_path / "other", "CONFIG_NET=n\n")
    assert kconfig.config_inputs_digest(tree, [changed], "1.42") != second


# --- skipping the generation when nothing it read changed ---------------------------------

AUTO_CONF_CMD = """\
deps_config := \\
\tnet/Kconfig \\
\tKconfig

include/config/auto.conf: $(deps_config)

ifneq "$(CC_VERSION_TEXT)" "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"
include/config/auto.conf: FORCE
endif

$(deps_config): ;
"""

# Stands in for virtme-configkernel: writes the config and Kbuild's list of
# Kconfig files read (from $DEPS), counts its runs, and can edit a file meanwhile.
CONFIGKERNEL = """\
import os, sys
work = [a[2:] for a in sys.argv if a.startswith("O=")][0]
open(os.path.join(work, "..", "runs"), "a").write("run\\n")
os.makedirs(os.path.join(work, "include", "config"), exist_ok=True)
deps = os.environ.get("DEPS", "net/Kconfig Kconfig").split()
with open(os.path.join(work, "include", "config", "auto.conf.cmd"), "w") as f:
    f.write("deps_config := \\\\\\n" + "".join(f"\\t{d} \\\\\\n" for d in deps[:-1])
            + f"\\t{deps[-1]}\\n\\n$(deps_config): ;\\n")
if os.environ.get("EDIT_DURING"):
    with open(os.environ["EDIT_DURING"], "a") as f:
        f.write("# edited while generating\\n")
open(os.path.join(work, ".config"), "w").write("CONFIG_NET=y\\n")
"""


def test_kbuilds_list_of_kconfig_files_read_is_parsed(tmp_path):
    (tmp_path / "include" / "config").mkdir(parents=True)
    assert kconfig.kconfig_files_read(tmp_path) is None
    (tmp_path / "include" / "config" / "auto.conf.cmd").write_text(AUTO_CONF_CMD)
    assert kconfig.kconfig_files_read(tmp_path) == ["net/Kconfig", "Kconfig"]


@pytest.fixture
def config_tree(tmp_path, monkeypatch):
    tree = tmp_path / "linux"
    (tree / "net").mkdir(parents=True)
    (tree / "drivers").mkdir()
    (tree / "Kconfig").write_text("source \"net/Kconfig\"\n")
    (tree / "net" / "Kconfig").write_text("config NET\n\tbool\n")
    (tree / "drivers" / "Kconfig").write_text("# sourced by nobody\n")
    (tree / "Makefile").write_text("VERSION = 6\n")
    tool = tmp_path / "virtme-configkernel"
    tool.write_text(f"#!{sys.executable}\n" + CONFIGKERNEL)
    tool.chmod(0o755)
    monkeypatch.setattr(kconfig, "find_tool", lambda name: str(tool))
    build_root = tmp_path / "build"
    frag = fragment(tmp_path, "CONFIG_NET=y\n")

    def configure():
        return kconfig.configure(tree, build_root / "obj", build_root / "config-gen", [frag],
                                 build_root / "config.log")

    def runs():
        return len((build_root / "runs").read_text().split())

    return tree, configure, runs


def test_generation_reruns_only_when_a_kconfig_file_it_read_changes(config_tree):
    tree, configure, runs = config_tree
    assert configure().regenerated and runs() == 1
    assert not configure().regenerated and runs() == 1
    # Not among the files Kbuild read: cannot change the config.
    (tree / "drivers" / "Kconfig").write_text("config UNUSED\n\tbool\n")
    assert not configure().regenerated
    (tree / "net" / "Kconfig").write_text("config NET\n\tbool \"Networking\"\n")
    result = configure()
    assert result.regenerated and not result.rewritten and runs() == 2
    (tree / "Kconfig").unlink()
    assert configure().regenerated and runs() == 3


def test_an_edit_during_the_generation_is_not_trusted(config_tree, monkeypatch):
    tree, configure, runs = config_tree
    monkeypatch.setenv("EDIT_DURING", str(tree / "net" / "Kconfig"))
    configure()
    monkeypatch.delenv("EDIT_DURING")
    assert configure().regenerated and runs() == 2
    assert not configure().regenerated


def test_a_kconfig_file_first_read_by_the_generation_is_not_trusted(config_tree, monkeypatch):
    tree, configure, runs = config_tree
    configure()
    (tree / "net" / "Kconfig").write_text("config NET\n\tbool\nsource \"drivers/Kconfig\"\n")
    monkeypatch.setenv("DEPS", "net/Kconfig Kconfig drivers/Kconfig")
    assert configure().regenerated
    # drivers/Kconfig was not hashed before that generation ran: generate once more.
    assert configure().regenerated and runs() == 3
    assert not configure().regenerated

"""Config fragments as data and the survival check after olddefconfig, on a real .config."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import kconfig
from runner.errors import ConfigError, ExitCode, UsageError

FIXTURES = Path(__file__).parent / "fixtures" / "runner"
REPO = Path(__file__).resolve().parent.parent
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

"""Kernel-free tests of `run-selftests mutants`: catalogue, patches, --from-diff operators, table."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from runner.commands import cli, mutants, pipeline
from runner.commands.mutants import (
    BUILD_ERROR,
    EQUIVALENT,
    ERROR,
    KILLED,
    SURVIVED,
    Mutant,
    Outcome,
)
from runner.errors import ExitCode, UsageError

SK_FILES = {"kernel/bpf/bpf_local_storage.c", "net/core/bpf_sk_storage.c"}
# Where the rest of the kernel meets sk storage: the verifier's map/helper rules, the spin-lock
# map types, each program type's helper table, and the socket's destroy and clone paths.
CALLERS = {"kernel/bpf/verifier.c", "kernel/bpf/syscall.c", "net/core/filter.c",
           "kernel/bpf/cgroup.c", "kernel/trace/bpf_trace.c", "net/core/sock.c"}


def write_catalogue(tmp_path: Path, entries) -> Path:
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps(entries))
    return path


def entry(**over) -> dict:
    base = {"id": "m-one", "file": "a.c", "find": "x == 1", "replace": "x != 1",
            "breaks": "inverts the test"}
    base.update(over)
    return base


# --- the real catalogue ------------------------------------------------------------------------


def test_real_catalogue_has_forty_runnable_mutants_of_the_sk_storage_code():
    catalogue = mutants.load_catalogue()
    runnable = [m for m in catalogue if not m.equivalent]
    assert len(runnable) >= 40
    files = {m.file for m in catalogue}
    assert SK_FILES <= files <= SK_FILES | CALLERS
    assert len({m.id for m in catalogue}) == len(catalogue)
    for m in catalogue:
        assert m.breaks.strip() and "\n" not in m.breaks, m.id
        assert m.find != m.replace, m.id


def test_real_catalogue_argues_every_equivalent_mutant():
    equivalent = [m for m in mutants.load_catalogue() if m.equivalent]
    assert len(equivalent) >= 5
    for m in equivalent:
        assert len(m.equivalent.split()) >= 8 and "\n" not in m.equivalent, m.id


def test_real_series_sections_touch_the_mutated_files():
    """The series' own edits to the sk-storage files are found (mutants sit on top of them)."""
    for rel in SK_FILES:
        sections = mutants.series_sections(pipeline.DEFAULT_SERIES, rel)
        assert sections, rel
        assert all(s.startswith("diff --git a/" + rel) for s in sections)


# --- catalogue errors --------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"breaks": ""}, "lacks breaks"),
    ({"replace": "x == 1"}, "replace equals find"),
    ({"id": "Bad_Id"}, "lower-case"),
    ({"occurrence": 0}, "occurrence must be a positive integer"),
    ({"occurrence": True}, "occurrence must be a positive integer"),
    ({"breaks": "two\nlines"}, "one line"),
    ({"colour": "red"}, "unknown field"),
])
def test_broken_catalogue_entry_is_a_usage_error(tmp_path, bad, message):
    path = write_catalogue(tmp_path, [entry(**bad)])
    with pytest.raises(UsageError, match=message):
        mutants.load_catalogue(path)


def test_missing_replace_and_duplicate_ids_are_refused(tmp_path):
    no_replace = entry()
    del no_replace["replace"]
    with pytest.raises(UsageError, match="lacks replace"):
        mutants.load_catalogue(write_catalogue(tmp_path, [no_replace]))
    with pytest.raises(UsageError, match="used twice"):
        mutants.load_catalogue(write_catalogue(tmp_path, [entry(), entry()]))
    with pytest.raises(UsageError, match="does not exist"):
        mutants.load_catalogue(tmp_path / "absent.json")


def test_select_keeps_catalogue_order_and_refuses_unknown_ids():
    ms = [Mutant(f"m{i}", "a.c", "x", "y", "b") for i in range(3)]
    assert [m.id for m in mutants.select(ms, "m2,m0")] == ["m0", "m2"]
    with pytest.raises(UsageError, match="no mutant nope"):
        mutants.select(ms, "m1,nope")


# --- edits and patches -------------------------------------------------------------------------


def test_apply_edit_needs_a_unique_match_or_an_occurrence():
    text = "a == b;\nc == d;\na == b;\n"
    with pytest.raises(ValueError, match="matches 2 times"):
        mutants.apply_edit(text, Mutant("m", "f.c", "a == b", "a != b", "x"))
    with pytest.raises(ValueError, match="matches 0 times"):
        mutants.apply_edit(text, Mutant("m", "f.c", "zz", "yy", "x"))
    second = Mutant("m", "f.c", "a == b", "a != b", "x", occurrence=2)
    assert mutants.apply_edit(text, second) == "a == b;\nc == d;\na != b;\n"
    with pytest.raises(ValueError, match="not a 3rd"):
        mutants.apply_edit(text, Mutant("m", "f.c", "a == b", "a != b", "x", occurrence=3))


def test_mutant_patch_applies_with_patch_p1_on_top_of_the_series(tmp_path):
    """The made patch, given to patch(1) as the pipeline would, produces the mutant."""
    old = "".join(f"line {i}\n" for i in range(20)) + "if (x < max)\n" + "tail\n" * 5
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "f.c").write_text(old)
    mutant = Mutant("lt-le", "net/f.c", "if (x < max)", "if (x <= max)", "admits max")
    text = mutants.mutant_patch(mutant, {"net/f.c": old})
    assert text.startswith("diff --git a/net/f.c b/net/f.c\n--- a/net/f.c\n+++ b/net/f.c\n@@")
    subprocess.run(["patch", "-p1", "-s", "-d", str(tmp_path)], input=text, text=True,
                   check=True)
    assert (tmp_path / "net" / "f.c").read_text() == old.replace("x < max", "x <= max")


def test_post_series_texts_apply_the_series_sections_of_each_file(tmp_path):
    source = tmp_path / "src"
    (source / "net").mkdir(parents=True)
    (source / "net" / "f.c").write_text("one\ntwo\nthree\n")
    (source / "net" / "g.c").write_text("alpha\n")
    patch = mutants.unified_patch({"net/f.c": ("one\ntwo\nthree\n", "one\n2\nthree\n"),
                                   "net/g.c": ("alpha\n", "alpha\nbeta\n")})
    (tmp_path / "p.patch").write_text("Subject: a commit message\n\n" + patch)
    (tmp_path / "series").write_text("p.patch\n")
    texts = mutants.post_series_texts(source, tmp_path / "series", ["net/f.c"])
    assert texts == {"net/f.c": "one\n2\nthree\n"}
    assert (source / "net" / "f.c").read_text() == "one\ntwo\nthree\n"  # tree untouched
    with pytest.raises(UsageError, match="not a file"):
        mutants.post_series_texts(source, tmp_path / "series", ["net/h.c"])


def test_split_patch_and_added_lines():
    before, after = "1\n2\n3\n4\n5\n6\n7\n8\n", "1\n2\nnew\n3\n4\n5\n6\n7\nlast\n8\n"
    patch = mutants.unified_patch({"a/x.c": (before, after), "b/y.c": ("k\n", "k2\n")})
    sections = mutants.split_patch("From: someone\n\n" + patch)
    assert set(sections) == {"a/x.c", "b/y.c"}
    assert mutants.added_lines(before, after) == {3, 9}
    assert mutants.added_lines("k\n", "k2\n") == {1}
    assert mutants.added_lines(after, before) == set()  # removals add nothing


# --- --from-diff -------------------------------------------------------------------------------


def test_operator_mutants_touch_only_the_given_lines():
    text = "int f(int a)\n{\n\tif (a == 1 && b)\n\t\treturn 0;\n\tcount++;\n\treturn a < 3;\n}\n"
    made = mutants.operator_mutants("k/f.c", text, {3, 5})
    ids = {m.id for m in made}
    assert ids == {"f-c-3-eq-to-ne", "f-c-3-and-to-or", "f-c-5-inc-to-dec", "f-c-5-drop"}
    for m in made:
        after = mutants.apply_edit(text, m)
        changed = [i + 1 for i, (x, y) in enumerate(zip(text.splitlines(), after.splitlines()))
                   if x != y]
        assert changed in ([3], [5]), m.id
    drop = next(m for m in made if m.id.endswith("-drop"))
    assert "\tcount++;" not in mutants.apply_edit(text, drop)


def test_diff_mutants_follow_the_users_added_lines():
    """The user's diff is against the pristine file; the series underneath moves its lines.
    The mutant must land on the line the user added, wherever the series put it."""
    pristine = "a\nb\nc\nd\ne\n"
    user_diff = mutants.unified_patch({"net/f.c": (pristine,
                                                   "a\nb\nif (x != NULL)\nc\nd\ne\n")})
    after_series = "series 1\nseries 2\na\nb\nc\nd\ne\n"
    with_change = mutants.patch_text(after_series, mutants.split_patch(user_diff)["net/f.c"],
                                     "net/f.c")
    assert with_change == "series 1\nseries 2\na\nb\nif (x != NULL)\nc\nd\ne\n"
    made = mutants.diff_mutants({"net/f.c": after_series}, {"net/f.c": with_change})
    assert [m.id for m in made] == ["f-c-5-ne-to-eq"]
    assert "if (x == NULL)" in mutants.apply_edit(with_change, made[0])
    # The mutant's patch carries the user's change as well.
    patch = mutants.mutant_patch(made[0], {"net/f.c": after_series}, {"net/f.c": with_change})
    assert "+if (x == NULL)" in patch and "+if (x != NULL)" not in patch


# --- verdicts and the table --------------------------------------------------------------------


def summary(code: int, tests=(), reason: str = "r", verdict: str = "v") -> dict:
    return {"exit_code": code, "reason": reason, "verdict": verdict,
            "tests": [{"name": n, "outcome": o} for n, o in tests]}


@pytest.mark.parametrize("data, status, detail", [
    (summary(0, [("t1", "passed")]), SURVIVED, "r"),
    (summary(1, [("t1", "failed"), ("t2", "passed"), ("t3", "error")]), KILLED,
     "2 failed: t1, t3"),
    (summary(3, [("t1", "passed")], "kmemleak: 131 objects", "splat"), KILLED,
     "no failing test: splat (kmemleak: 131 objects)"),
    (summary(4, (), "guest stalled"), KILLED, "no failing test"),
    (summary(5, (), "make failed"), BUILD_ERROR, "make failed"),
    (summary(6, (), "patch did not apply"), BUILD_ERROR, "patch did not apply"),
    (summary(7, (), "qemu"), ERROR, "exit 7: qemu"),
    (None, ERROR, "no summary.json"),
])
def test_classify(data, status, detail):
    got_status, got_detail = mutants.classify(data)
    assert got_status == status
    assert got_detail.startswith(detail)


def test_failures_of_the_unmutated_kernel_kill_nothing():
    """A test failing without any mutant (a stale known-bug entry, say) is no kill."""
    data = summary(1, [("known_bug", "failed"), ("t2", "passed")])
    status, detail = mutants.classify(data, baseline_failures=["known_bug"])
    assert (status, detail) == (SURVIVED, "only the unmutated kernel's own failures: known_bug")
    data = summary(1, [("known_bug", "failed"), ("new_one", "failed")])
    assert mutants.classify(data, baseline_failures=["known_bug"]) == (KILLED, "1 failed: new_one")
    # A splat still kills, whatever the baseline's failures.
    data = summary(3, [("known_bug", "failed")], "WARNING in map_free", "splat")
    assert mutants.classify(data, baseline_failures=["known_bug"])[0] == KILLED


@pytest.mark.parametrize("data, usable", [
    (summary(0), True), (summary(1, [("k", "failed")]), True),
    (summary(3, (), "oops", "splat"), False), (summary(5, (), "make"), False), (None, False)])
def test_baseline_must_have_built_and_run_cleanly(tmp_path, data, usable):
    if data is not None:
        (tmp_path / "summary.json").write_text(json.dumps(data))
    known, problem = mutants.baseline_failures(tmp_path)
    assert (problem is None) == usable
    if usable:
        assert known == mutants.failed_tests(data)


def test_killed_detail_shows_three_failures_and_counts_the_rest():
    data = summary(1, [(f"t{i}", "failed") for i in range(5)])
    assert mutants.classify(data) == (KILLED, "5 failed: t0, t1, t2 (+2 more)")


def outcomes() -> list[Outcome]:
    return [Outcome("a", "f.c", "breaks a", KILLED, "1 failed: t", 200.0, 1),
            Outcome("b", "f.c", "breaks b", SURVIVED, "passed", 100.0, 0),
            Outcome("c", "f.c", "breaks c", EQUIVALENT, "because"),
            Outcome("d", "f.c", "breaks d|pipe", BUILD_ERROR, "make", 30.0, 5)]


def test_markdown_table_tally_and_score():
    text = mutants.markdown(outcomes(), "Mutation sweep")
    assert text.startswith("# Mutation sweep\n\n| mutant | file | breaks | status |")
    assert "| `b` | `f.c` | breaks b | **survived** | passed | 1 m 40 s |" in text
    assert "breaks d\\|pipe" in text
    assert "4 mutants: 1 killed, 1 survived, 1 equivalent, 1 build-error, 0 error." in text
    assert "Score: 1/2 killed (50%)." in text
    assert "mean 1 m 50 s" in text
    assert mutants.score(outcomes()) == (1, 2)


def test_exit_code():
    assert mutants.exit_code(outcomes()) == int(ExitCode.TEST_FAILURE)
    assert mutants.exit_code([o for o in outcomes() if o.status != SURVIVED]) == 0
    error = Outcome("e", "f.c", "x", ERROR, "qemu", None, 7)
    assert mutants.exit_code(outcomes() + [error]) == 7


def test_from_dir_rebuilds_the_table_without_booting(tmp_path, capsys):
    catalogue = write_catalogue(tmp_path, [
        entry(id="killed-one"), entry(id="survivor"), entry(id="argued", equivalent="why")])
    run_dir = tmp_path / "run"
    for name, data in (("killed-one", summary(1, [("test_x", "failed"), ("stale", "failed")])),
                       ("survivor", summary(1, [("stale", "failed")])),
                       ("baseline", summary(1, [("stale", "failed")]))):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "summary.json").write_text(json.dumps(data))
    code = cli.main(["mutants", "--catalogue", str(catalogue), "--from-dir", str(run_dir)])
    assert code == int(ExitCode.TEST_FAILURE)
    table = (run_dir / "mutants.md").read_text()
    assert "Score: 1/2 killed (50%)." in table and "| equivalent | why |" in table
    assert "| killed | 1 failed: test_x |" in table
    assert "Failing on the unmutated kernel too (kill nothing): `stale`." in table
    data = json.loads((run_dir / "mutants.json").read_text())
    assert (data["killed"], data["scored"], data["total"]) == (1, 2, 3)
    assert data["baseline_failures"] == ["stale"]
    assert "Score: 1/2" in capsys.readouterr().out



def test_from_dir_merges_a_sweep_run_in_parts(tmp_path):
    """A sweep cut short and finished in a second run: one table, each part judged by its
    own baseline, the later run's row kept for a mutant run in both."""
    catalogue = write_catalogue(tmp_path, [
        entry(id="first"), entry(id="rerun"), entry(id="second"), entry(id="argued",
                                                                        equivalent="why")])
    parts = {"part1": {"baseline": summary(0, []), "first": summary(1, [("test_a", "failed")]),
                       "rerun": summary(0, [])},
             "part2": {"baseline": summary(1, [("flaky", "failed")]),
                       "rerun": summary(1, [("test_b", "failed")]),
                       "second": summary(1, [("flaky", "failed")])}}
    for part, runs in parts.items():
        for name, data in runs.items():
            (tmp_path / part / name).mkdir(parents=True)
            (tmp_path / part / name / "summary.json").write_text(json.dumps(data))
    argv = ["mutants", "--catalogue", str(catalogue), "--from-dir", str(tmp_path / "part1"),
            "--from-dir", str(tmp_path / "part2")]
    assert cli.main(argv) == int(ExitCode.USAGE)  # where does the merged table go?
    assert cli.main(argv + ["--output", str(tmp_path / "all")]) == int(ExitCode.TEST_FAILURE)
    data = json.loads((tmp_path / "all" / "mutants.json").read_text())
    statuses = {m["id"]: m["status"] for m in data["mutants"]}
    assert statuses == {"first": KILLED, "rerun": KILLED, "second": SURVIVED,
                        "argued": EQUIVALENT}
    assert [m["id"] for m in data["mutants"]] == ["first", "rerun", "second", "argued"]
    assert data["baseline_failures"] == ["flaky"]
    assert not (tmp_path / "part1" / "mutants.md").exists()  # the parts are left alone
    missing = ["--from-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]
    assert cli.main(argv + missing) == int(ExitCode.USAGE)


@pytest.mark.parametrize("base_patch", [None, "diff --git a/x.c b/x.c\n"],
                         ids=["catalogue", "from-diff"])
def test_the_baseline_is_the_users_change_without_mutation(tmp_path, monkeypatch, base_patch):
    """--from-diff mutants carry the user's change: their baseline must carry it too, or a
    test that the change itself fails would count as killing every mutant."""
    from runner.cache import open_cache
    from runner.stages.patches import load_series

    seen = []

    def fake_run(options, target, log, verbose):
        seen.append(options)
        target.mkdir(parents=True, exist_ok=True)
        (target / "summary.json").write_text(json.dumps(summary(1, [("test_changed", "failed")])))
        return 1.0, None

    monkeypatch.setattr(mutants.regressions, "run_one", fake_run)
    parser = argparse.ArgumentParser()
    mutants.add_arguments(parser)
    args = parser.parse_args(["--cache-dir", str(tmp_path / "cache")])
    cache = open_cache(tmp_path / "cache")
    series = mutants.baseline_series(cache, tmp_path / "out", base_patch)
    known = mutants.baseline(args, tmp_path / "out", lambda _: None, series)
    assert known == ["test_changed"]  # kills no mutant
    if base_patch is None:
        assert seen[0].series is None  # the default series
    else:
        entries = load_series(seen[0].series).entries
        assert entries[-1].path.resolve() == (tmp_path / "out" / "baseline" /
                                              mutants.USER_CHANGE).resolve()
        assert entries[-1].path.read_text() == base_patch


def test_options_that_pick_another_kernel_are_refused():
    assert cli.main(["mutants", "--distro-kernel", "6.1"]) == int(ExitCode.USAGE)


def test_slot_series_gets_a_build_directory_apart_from_the_regressions(tmp_path):
    """Same source and fragments, but the slot's name keys another build directory, so a
    regression sweep can never rebuild the kernel a mutant's guest is about to boot."""
    from runner.commands import regressions
    from runner.stages import build
    from runner.stages.patches import load_series

    patch = tmp_path / "m.patch"
    patch.write_text("")
    ours = mutants.prepare_slot_series(tmp_path / "mutants", pipeline.DEFAULT_SERIES, patch)
    theirs = regressions.prepare_slot_series(tmp_path / "regressions", pipeline.DEFAULT_SERIES,
                                             patch)
    assert ours.read_text().splitlines()[-1] == mutants.SLOT
    assert (tmp_path / "mutants" / mutants.SLOT).resolve() == patch.resolve()
    assert not (tmp_path / "mutants" / regressions.SLOT).exists()
    key = build.build_key(tmp_path, load_series(ours), [])[0]
    assert key != build.build_key(tmp_path, load_series(theirs), [])[0]
    # Re-pointing keeps the same series (and so the same build directory) for every mutant.
    other = tmp_path / "n.patch"
    other.write_text("")
    again = mutants.prepare_slot_series(tmp_path / "mutants", pipeline.DEFAULT_SERIES, other)
    assert build.build_key(tmp_path, load_series(again), [])[0] == key
    assert (tmp_path / "mutants" / mutants.SLOT).resolve() == other.resolve()


def test_a_mutant_run_stops_at_its_first_failure_unless_the_baseline_fails_tests():
    options = pipeline.RunOptions(argv=["mutants"])
    clean = mutants.mutant_run_options(options, "m1", [])
    assert clean.exitfirst and clean.argv == ["mutants", "--only", "m1"]
    # A baseline failure could stop the run before the test that kills the mutant.
    dirty = mutants.mutant_run_options(options, "m1", ["test_x.py::test_y"])
    assert not dirty.exitfirst

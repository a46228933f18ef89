"""build_from_source with the kernel build faked: what the boot stage is handed."""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from runner import record
from runner.cache import open_cache
from runner.commands import pipeline
from runner.stages import artifacts, build, kconfig, patches
from runner.stages.source import KernelSource


def test_the_booted_image_is_a_copy_taken_under_the_tree_lock(tmp_path, monkeypatch):
    """Another run of the same source may rebuild the build directory's image as soon as the
    tree lock is released: the run must boot its own copy, taken before that."""
    tree = tmp_path / "linux"
    tree.mkdir()
    cache = open_cache(tmp_path / "cache")
    journal = patches.journal_dir_for(cache.root, tree)
    lock_file = journal.with_name(journal.name + ".lock")

    def fake_configure(source, obj_dir, work_dir, fragments, log_file):
        obj_dir.mkdir(parents=True, exist_ok=True)
        (obj_dir / ".config").write_text("CONFIG_BPF_SYSCALL=y\n")
        return kconfig.ConfigResult(obj_dir / ".config", regenerated=False, rewritten=False)

    def fake_build(source, build_dir, jobs, targets, cache_):
        image = build_dir.obj / build.BZIMAGE
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"kernel A")
        return build.BuildResult(image, 1.0, 1, "make")

    held_while_copying = []
    real_copy = shutil.copyfile

    def copy_and_check_lock(src, dst, *args, **kwargs):
        if Path(dst).name != artifacts.BOOTED_IMAGE:  # the logs are saved after the build
            return real_copy(src, dst, *args, **kwargs)
        with open(lock_file, "a") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_while_copying.append(True)
            else:
                fcntl.flock(probe, fcntl.LOCK_UN)
                held_while_copying.append(False)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(kconfig, "configure", fake_configure)
    monkeypatch.setattr(build, "build_kernel", fake_build)
    monkeypatch.setattr(pipeline.shutil, "copyfile", copy_and_check_lock)
    out = tmp_path / "out"
    out.mkdir()
    kernel = pipeline.build_from_source(
        pipeline.RunOptions(kernel_src=tree), KernelSource(tree, False, "a tree", "6.1"),
        cache, out, {}, record.RunRecord(), lambda _: None)

    assert kernel.image == out / artifacts.BOOTED_IMAGE
    assert held_while_copying == [True]
    # The next run rebuilds the shared build directory: this run's kernel stays A.
    built = next((cache.root / "build").glob("*/obj")) / build.BZIMAGE
    built.write_bytes(b"kernel B")
    assert Path(kernel.image).read_bytes() == b"kernel A"

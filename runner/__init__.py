"""Host side of the sk-storage selftests: build or fetch a kernel, boot it, judge the run.

Stages, one module each, in pipeline order: source -> patches -> kconfig ->
build (or prebuilt) -> boot (with accel) -> results -> artifacts; pipeline.py
sequences them and cli.py is the `run-selftests` entry point.
"""

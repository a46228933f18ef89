"""Host side of the sk-storage selftests: build or fetch a kernel, boot it, judge the run.

The tree follows the run (see the README's "What a run does"):

* `runner.stages`: one module per pipeline stage, in order source -> patches ->
  kconfig -> build (or prebuilt, debug_kernel) -> accel -> boot -> results -> artifacts.
* `runner.targets`: where the suite runs when it is not a fresh VM: an SSH host
  (`remote`, with `ssh`, `remote_bundle`, `remote_transfer`) or a kept guest (`keep`).
* `runner.commands`: the `run-selftests` entry point (`cli`) and one module per
  command; `pipeline` is the default command and sequences the stages.
* `runner.guest`: code that runs on the target or in the guest, not on this host.
* This package's own modules are the helpers every layer shares, one concern each:
  `errors` (exit codes), `record` (summary.json), `cache`, `preflight`, `progress`,
  `interrupts`, `process_group`, `atomic_file`, `file_lock`, `markdown`.
"""

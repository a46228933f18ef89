"""The pipeline's stages, one module each, in the order a run goes through them.

source -> patches -> kconfig -> build -> boot -> results, where a prebuilt kernel
(`prebuilt`, fetched through `debian_archive`) or a debug kernel (`debug_kernel`,
judged with `kmemleak`) can take the build's place, `accel` picks KVM or TCG for
the boot, `guest_bundle` prepares the guest's start-up imports, and `artifacts`
lays out the run's output directory.  Each stage takes
plain values and returns plain values; `runner.commands.pipeline` sequences them.
"""

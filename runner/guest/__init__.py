"""Code that runs on the target or inside the guest, never on this host.

`remote_driver` is copied to an SSH target and runs with whatever python3 that
machine has; `kmemleak_guest` runs inside the guest, by path, with nothing of
the runner importable.  So each module here uses only the standard library and
`bpfkit` (the suite's own stdlib-only library, which travels with the suite),
imports nothing from `runner`, and stays valid on the oldest Python the project
supports (3.9, `requires-python`).  The host imports them only to find their files.
"""

"""Where the suite runs when the runner does not boot a fresh VM for it.

`remote` runs it on another machine over SSH (`ssh` the connection,
`remote_bundle` what is pushed, `remote_transfer` how it moves); `keep` boots a
guest once and keeps it for later runs, which then reach it over SSH as well.
"""

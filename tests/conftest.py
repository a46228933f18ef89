"""Session-wide set-up for the project's own tests."""

import signal

# Tests interrupt real runner processes with SIGINT.  A shell without job
# control (nohup, `cmd &` in a script, some CI launchers) starts us with SIGINT
# ignored, and an ignored signal stays ignored across fork and exec, so those
# children would never see the Ctrl-C the tests send.  A handled signal is
# reset to its default on exec, which gives each child Python its usual
# KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)

"""Session-wide set-up for the project's own tests."""

import signal
from pathlib import Path

# tests/ mirrors the tree (tests/runner/stages/..., tests/bpfkit/...); test modules
# find the shared fixtures and the checkout through these, whatever their depth.
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
REPO = TESTS.parent

# Tests interrupt real runner processes with SIGINT.  A shell without job
# control (nohup, `cmd &` in a script, some CI launchers) starts us with SIGINT
# ignored, and an ignored signal stays ignored across fork and exec, so those
# children would never see the Ctrl-C the tests send.  A handled signal is
# reset to its default on exec, which gives each child Python its usual
# KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)


# Test modules whose background work conftest started, to stop at the end.
_BACKGROUND_MODULES: list = []


def pytest_collection_finish(session):
    """Start the selected real boots now, so they run while the quick tests do.

    A test module that boots a kernel offers start_in_background() and
    stop_background(); its test then only waits for that run and checks it.
    A real boot is a minute of mostly waiting on QEMU, the rest of the suite
    as long again of mostly sleeping: side by side instead of one after the other.
    """
    for item in session.items:
        module = item.module
        if hasattr(module, "start_in_background") and module not in _BACKGROUND_MODULES:
            _BACKGROUND_MODULES.append(module)
            module.start_in_background()


def pytest_unconfigure(config):
    """No background boot outlives the session (Ctrl-C, -x, a failure elsewhere)."""
    while _BACKGROUND_MODULES:
        _BACKGROUND_MODULES.pop().stop_background()


def checkout_hidden_from_guests():
    """The directory virtme-ng's guest init hides this checkout or venv under, else None.

    run-selftests refuses such a checkout up front (exit 2), so tests that drive the
    runner past its preflight cannot run from it; they skip with this stated reason.
    """
    import sys
    from pathlib import Path

    from runner.preflight import masked_in_guest

    return masked_in_guest(Path(__file__).resolve().parent) or masked_in_guest(Path(sys.executable))


HIDDEN_CHECKOUT = checkout_hidden_from_guests()
HIDDEN_CHECKOUT_REASON = (f"[environment] this checkout or its venv lies under {HIDDEN_CHECKOUT}, "
                          "which virtme-ng's guest init hides; run-selftests refuses it up front")

"""`python -m runner` is `run-selftests`, for checkouts where the script is not on PATH."""

import sys

from runner.commands.cli import main

sys.exit(main())

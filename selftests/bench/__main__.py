"""`python3 -m bench`: the egress counter benchmark (the only benchmark so far)."""

import sys

from bench.egress_counter import main

sys.exit(main())

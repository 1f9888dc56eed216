"""`python -m bench`: the benchmark harness (see bench/harness.py, or --help)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from bench.harness import main

    sys.exit(main())

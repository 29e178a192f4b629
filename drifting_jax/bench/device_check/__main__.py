"""`python -m drifting_jax.bench.device_check`: launch/device_check.sh's entry point, and each check's child process."""

from __future__ import annotations

import sys

from drifting_jax.bench.device_check.runner import main

if __name__ == "__main__":
  sys.exit(main())

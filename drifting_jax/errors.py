"""The one error type for a user's mistake, as opposed to a bug.

`UsageError` (a `ValueError`) is what the package raises when the fix is in the
user's hands: an unknown objective, kernel, data set, evaluator or mode, a config
value out of range, a missing or unreadable checkpoint or artifact, a data set that
is not prepared. `drifting_jax.main` prints it as one line, `error: <what, and the
fix>`, and exits with status 2; anything else keeps its traceback.

The loss library (`drifting_jax.losses`) imports nothing from the package and raises
plain `ValueError`s; the config layer that reads `config.loss` turns those into
`UsageError`s (`as_usage_error`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

EXIT_STATUS = 2  # as absl and argparse exit on a bad flag


class UsageError(ValueError):
  """A mistake in a config, a flag or a path; the message says what and how to fix it."""


@contextlib.contextmanager
def as_usage_error(context: str = "") -> Iterator[None]:
  """Re-raises a ValueError of the block (e.g. from the loss library) as a UsageError.

  Only for blocks whose ValueErrors all mean a bad user-supplied value, such as
  reading options out of a config.
  """
  try:
    yield
  except UsageError:
    raise
  except ValueError as e:
    raise UsageError(f"{context}{e}") from e


class MissingFileError(UsageError, FileNotFoundError):
  """A file or folder the run needs (weights, a data set, a cache) is not there; says what to fetch, and where."""

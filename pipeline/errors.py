"""User-facing errors: the CLI prints their one-line message and exits non-zero (no traceback unless --debug)."""


class KdcacheError(Exception):
    """A problem the user can fix: bad input, bad config, missing file, mismatched stores."""

"""Errors raised by the storage layer. Each message is one line that names the problem and the fix."""


class StoreError(Exception):
    """A store is missing, incomplete, corrupted or does not match what the caller expects."""

"""The error type for problems a user can fix (bad paths, bad layouts, bad files)."""

from cli import UserError


class DataError(UserError, ValueError):
    """A data problem with a one-line message that says what is wrong and what to do."""

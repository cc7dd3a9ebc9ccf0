"""The error type for problems a user can fix (bad paths, bad layouts, bad files)."""


class DataError(ValueError):
    """A data problem with a one-line message that says what is wrong and what to do."""

"""The one error type users see: bad input, reported as a single line by the CLI (exit 2)."""


class InputError(ValueError):
    """Bad user input (file, field or value); the message is one line naming what and where."""

"""The one error type users see: bad input, reported as a single line by the CLI (exit 2)."""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, field or value); the message is one line naming what and where.

    `keys` names the config keys the message is about, so a caller can say which file set them.
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


def printable(text: str, limit: int = 0) -> str:
    """`text` with control and other non-printable characters escaped (`\\x1b`, `\\n`), cut to `limit` if > 0."""
    # a bad file's bytes must not reach the terminal raw: escape sequences could rewrite the screen
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if limit <= 0 or len(out) <= limit else out[:limit - 3] + "..."

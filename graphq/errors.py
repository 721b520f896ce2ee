"""User-facing errors: each is reported by the CLI as one line, without a traceback."""


class GraphqError(Exception):
    """A problem with the user's input or environment that the user can fix.

    The message names the problem and what to do about it.
    """

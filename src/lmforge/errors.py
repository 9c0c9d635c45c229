"""The one exception type a user sees: a message that names the problem and the fix."""


class LmforgeError(Exception):
    """A user mistake or bad input. The CLI prints it as one line and exits with status 2."""

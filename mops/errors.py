"""The one exception type for input a user got wrong.

Raised wherever we can tell that a value the user typed (a path, a pattern, a field
name) is unusable; the CLIs print its message as one line and exit non-zero instead of
showing a traceback from deep inside a library.
"""


class UserError(ValueError):
    """Bad user input; the message names the bad value and what would be accepted."""

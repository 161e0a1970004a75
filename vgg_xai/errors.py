"""The one exception type a user sees: a problem with their input, and how to fix it."""


class UserError(Exception):
    """Bad input. The CLI prints the message on one line and exits non-zero, no traceback.

    The message names the thing at fault (a path, a key) and what to do about it.
    """

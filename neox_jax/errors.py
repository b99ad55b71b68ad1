"""Errors that the CLI reports as one line (no traceback) and a non-zero exit."""


class UserError(ValueError):
    """Bad input from the user: a file, key, tensor or value we cannot accept (the message names it)."""

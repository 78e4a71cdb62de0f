"""The one error type users see: a problem with their input, named with its fix."""


class UserError(Exception):
    """Bad input (file, config value, checkpoint) that a person can fix.

    The CLI prints the message without a traceback and exits with code 2. The message names the
    offending value, what was expected, and how to fix it.
    """


class UnsupportedModel(UserError):
    """A well-formed model folder whose architecture or modules our Flax port does not
    implement (callers with another backend fall back to it; damaged folders stay UserError)."""

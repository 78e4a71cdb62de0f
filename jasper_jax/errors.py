"""The one error type users see: a problem with their input, named with its fix."""


class UserError(Exception):
    """Bad input (file, config value, checkpoint) that a person can fix.

    The CLI prints the message without a traceback and exits with code 2. The message names the
    offending value, what was expected, and how to fix it.
    """


class UnsupportedModel(UserError):
    """A well-formed model folder whose architecture or modules our Flax port does not
    implement (callers with another backend fall back to it; damaged folders stay UserError)."""


def one_line(message: str | BaseException, limit: int = 300) -> str:
    """A library's multi-line message (or exception) as one line: its first and last lines,
    shortened; an exception without a message gives its type's name."""
    if isinstance(message, BaseException):
        message = str(message).strip() or type(message).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return (lines or [""])[0][: 2 * limit]
    return f"{lines[0][:limit]} ... {lines[-1][-limit:]}"

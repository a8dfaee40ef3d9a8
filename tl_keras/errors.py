"""The one exception type that users see as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input: flags, data, weights or model_dir. main prints it as one line and exits 1."""


def first_line(error: Exception) -> str:
    """The first line of an exception's message, for one-line user errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

"""The one exception type that users see as a single line instead of a traceback, and the one place
that turns library errors into such lines."""

import re
import signal

# Lines of TensorFlow error text that are decoration, not the reason.
_NOISE = ("[[", "Graph execution error", "Detected at node", "<stack traces", "Traceback", "File ")


class UserError(Exception):
    """Bad input: flags, data, weights or model_dir. main prints it as one line and exits 1."""


class Interrupted(Exception):
    """A SIGTERM or SIGINT stopped the run after saving; main exits with 128 + the signal's number."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"Stopped by {signal.Signals(signum).name} {where}; run the same command again to "
                         "resume from there.")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def first_line(error: Exception) -> str:
    """The first line of an exception's message, for one-line user errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def op_message(error: Exception) -> str:
    """TensorFlow's error text without its op, node and stack decorations: the reason alone.

    Graph errors put the reason last, after the stack of the node that raised it; eager errors have
    it on their only line.
    """
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(_NOISE)]
    return lines[-1] if lines else type(error).__name__

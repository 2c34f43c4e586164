"""Exceptions shared by the whole package (imports nothing from peft_bayes)."""


class InputError(ValueError):
    """Bad user input: a malformed file, an unknown flag value, a path that does not exist.

    The message is one line that names the offending file, field or flag and says what was expected. The
    command-line entry points print it as ``error: <message>`` and exit with status 2.
    """

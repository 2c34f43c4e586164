"""Exceptions shared by the whole package (imports nothing from peft_bayes)."""


class InputError(ValueError):
    """Bad user input: a malformed file, an unknown flag value, a path that does not exist.

    The message is one line that names the offending file, field or flag and says what was expected. The
    command-line entry points print it as ``error: <message>`` and exit with status 2.
    """


def did_you_mean(value: object, names) -> str:
    """`` (did you mean 'lora'?)`` for the names nearest a mistyped ``value`` (difflib's ratio >= 0.6), else ``""``:
    the suffix of an unknown-name error."""
    import difflib

    near = difflib.get_close_matches(str(value), [str(n) for n in names], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""

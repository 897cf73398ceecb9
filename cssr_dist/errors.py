"""User-facing errors: each renders as ONE line saying what was wrong, where, and what to do.

`train.py` catches these and prints `error: <message>` without a traceback, because a
researcher who mistyped a key needs the fix, not a stack.
"""


class CssrError(Exception):
    """Base class of errors caused by user input (config, data, files), not by bugs."""


class ConfigError(CssrError):
    """A config file, override or flag is invalid."""


class DataError(CssrError):
    """A data set, split file or shard is missing, malformed or inconsistent."""

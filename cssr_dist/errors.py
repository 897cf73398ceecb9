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


def check_plain_name(name: object, what: str, error: type[CssrError] = ConfigError) -> str:
    """`name` as ONE plain path component, or `error` in one line.

    The project turns these names into paths (run names -> `<output_dir>/<name>/`, OOD set
    names -> `<data.root>/<name>`, sweep names -> run folders), so a name like `..`, `/etc`,
    `a/b`, an empty one or one with control characters would read or write outside the
    folder the user chose. Paths given as paths (data roots, --out) are not names.
    """
    text = name if isinstance(name, str) else ""
    bad = ("empty" if not text else "'.' or '..'" if text in (".", "..")
           else "a path separator" if "/" in text or "\\" in text
           else "a control character" if any(ord(c) < 32 or ord(c) == 127 for c in text)
           else "a leading '-'" if text.startswith("-") else None)
    if not isinstance(name, str):
        bad = f"not a string ({type(name).__name__})"
    if bad:
        raise error(f"{what} = {name!r} is not a plain name ({bad}); use one folder name such as "
                    "'fmnist_rcssr_a' (letters, digits, '_', '-', '.')")
    return text

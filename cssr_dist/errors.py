"""User-facing errors: each renders as ONE line saying what was wrong, where, and what to do.

`train.py` catches these and prints `error: <message>` without a traceback, because a
researcher who mistyped a key needs the fix, not a stack.
"""

import errno
import os
import shutil
import sys
from pathlib import Path


class CssrError(Exception):
    """Base class of errors caused by user input (config, data, files), not by bugs."""


class ConfigError(CssrError):
    """A config file, override or flag is invalid."""


class DataError(CssrError):
    """A data set, split file or shard is missing, malformed or inconsistent."""


class StorageError(CssrError):
    """Writing failed: disk full, quota, read-only folder or an I/O error."""


class FailedOnAnotherRank(StorageError):
    """This rank's part of a write succeeded but another rank's failed (the ranks agree on every
    checkpoint write, so all stop). That rank's own line names the cause; this one is printed
    only when that line never comes (`cli.report_once`)."""


#: errno values that mean "the storage refused the write", not a bug
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})


def storage_error(err: OSError, what: str, folder: str | os.PathLike, needed_bytes: int | None = None) -> StorageError:
    """One line for a failed write: the folder, why, the space needed and free, what to do."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.is_dir()), Path("/"))
    try:
        free = f"{shutil.disk_usage(probe).free / 1e6:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    needed = f"about {needed_bytes / 1e6:.1f} MB needed, " if needed_bytes else ""
    reason = err.strerror or type(err).__name__
    code = errno.errorcode.get(err.errno or 0, "")
    return StorageError(f"cannot write {what} in {folder}: {reason}{f' ({code})' if code else ''}; {needed}{free}; "
                        "free space or make the folder writable, then rerun the same command: the run resumes "
                        "from its last complete checkpoint")


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


def user_message(err: BaseException) -> str:
    """The one line to show for `err`. An error raised in a DataLoader worker reaches the main
    process re-created by torch with the worker's whole traceback as its message; the user
    needs only that traceback's last line, the worker's own message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


#: Exit status of a program stopped by a user-facing error (bad config, data, names, storage).
USER_ERROR_EXIT = 2


def report(err: BaseException) -> int:
    """Print `err` as the one `error:` line every program ends with; returns USER_ERROR_EXIT."""
    print(f"error: {user_message(err)}", file=sys.stderr)
    return USER_ERROR_EXIT

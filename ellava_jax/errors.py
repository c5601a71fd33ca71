"""The project's own errors: what the command line turns into one line and an exit code.

- `UserError` (exit 2): bad input, named by file, key, line or value. It subclasses ValueError
  so library callers that catch ValueError keep working; `MissingInput` is also a
  FileNotFoundError.
- `EnvironmentFailure` (exit 1): the machine, not the input: a full disk, a read-only target.
- Anything else is an internal bug: the command line shows its traceback and asks for a report.
"""

from __future__ import annotations

import errno
import os


class UserError(ValueError):
    """Bad input from the user: the message is the one line they see (exit code 2)."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (exit code 2)."""


class EnvironmentFailure(RuntimeError):
    """The environment failed, not the input: disk full, read-only target (exit code 1)."""


# OSError numbers that mean the machine, not the input or the code, failed.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
}


def environment_message(exc: BaseException) -> str | None:
    """One line for an exception that is the environment's failure, else None.

    Covers OSErrors with the numbers above and libraries that wrap them in their own class
    with the OS's text (safetensors' `SafetensorError: ... No space left on device`).
    """
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = exc.filename or ""
        reason = exc.strerror or str(exc)
        return f"{where}: {reason}" if where else reason
    text = str(exc)
    for e in ENVIRONMENT_ERRNOS:
        reason = os.strerror(e)
        if reason in text:
            return text.splitlines()[0] if text else reason
    return None


def run_script(main) -> None:
    """`if __name__ == "__main__": run_script(main)` for the benchmark scripts: a UserError
    (a bad recipe or --set) ends in its one line and exit code 2, as on the command line."""
    import sys

    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    raise SystemExit(code)

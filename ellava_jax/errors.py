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
import signal
import sys
import threading
import traceback
from collections.abc import Callable


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


AFTER_STOP = (
    "unfinished outputs were removed, earlier ones kept (a search resumes from its last round)"
)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` and atomic write cleans up."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_reporting(name: str, body: Callable[[], int | None]) -> int:
    """Runs `body()` and turns what it raises into one line on stderr and an exit code.

    0 success (or body's own code); 2 a user's error (one line naming the file, key or value);
    1 a failure of the environment (disk full, read-only target; one line); 130 Ctrl-C and 143
    SIGTERM, both after every `finally` ran; 70 an internal bug (its traceback and a request to
    report it). `name` starts each line (`ellava search`, `real_model.py`). Used by the
    `ellava` command line and the benchmark scripts alike.
    """

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(body() or 0)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except EnvironmentFailure as e:
        print(f"{name}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C); {AFTER_STOP}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated (SIGTERM); {AFTER_STOP}", file=sys.stderr)
        return 143
    except Exception as e:
        msg = environment_message(e)
        if msg is not None:
            print(f"{name}: failed: {msg}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(
            f"{name}: internal error ({type(e).__name__}): this is a bug in ellava-jax; please "
            "report it with the command line and the traceback above",
            file=sys.stderr,
        )
        return 70
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_script(main: Callable[[], int | None]) -> None:
    """`if __name__ == "__main__": run_script(main)` for the benchmark scripts: the same lines
    and exit codes as the `ellava` command line (`run_reporting`), named by the script's file."""

    raise SystemExit(run_reporting(os.path.basename(sys.argv[0]), main))

"""Output directories written whole or not at all.

`atomic_directory(path)` hands out a temporary directory beside `path`; when the block ends
without an error it takes `path`'s place (an existing `path` is moved aside first and removed
only after the new one is in place), and on an error it is deleted. A killed or failed write
never leaves a half-written `path`, and never removes a good one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields a temporary directory that replaces `path` when the block succeeds."""
    path = os.path.abspath(os.fspath(path)).rstrip("/")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = path + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

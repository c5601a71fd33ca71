"""Paths the user names: checked before use, every problem one `UserError` line naming the path.

- `check_file` / `check_dir`: a missing path is `MissingInput`; a directory where a file goes
  (or the reverse), a symbolic-link loop or a broken link is a `UserError` that says so.
- `confined_image`: an image path read from a jsonl line must stay inside the jsonl's folder
  (relative, symbolic links resolved), or inside an image root the user names (`--image-root`).
- `read_image`: an image file as uint8 [H, W, 3]; a file that is not an image names the file
  and the jsonl line.
- `jsonl_objects`: the JSON objects of a jsonl file, each with its line; bad JSON, a value that
  is not an object and text that is not UTF-8 name the file and the line.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ellava_jax.errors import MissingInput, UserError


def _stat(path: str, what: str, missing: str | None) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MissingInput(
                f"{path}: broken symbolic link (to {os.readlink(path)!r}); expected a {what}"
            ) from None
        raise MissingInput(f"{path}: {missing or f'no such {what}'}") from None
    except NotADirectoryError:
        raise MissingInput(
            f"{path}: {missing or f'no such {what}'} (a parent is not a directory)"
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path}: symbolic link loop (the {what} cannot be resolved)") from None
        if e.errno == errno.ENAMETOOLONG:
            raise UserError(f"{path}: file name too long") from None
        raise


def check_file(path: str | os.PathLike, what: str = "file", missing: str | None = None) -> str:
    """`path` as a string if it names a regular file (after links); else a one-line error.

    Args:
      what: what the file is, for the messages ("evaluation file", "policy file").
      missing: the message for a path that does not exist (default "no such {what}").
    """
    path = os.fspath(path)
    st = _stat(path, what, missing)
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory, expected a file ({what})")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: is not a regular file, expected a {what}")
    return path


def check_dir(path: str | os.PathLike, what: str = "directory", missing: str | None = None) -> str:
    """`path` as a string if it names a directory (after links); else a one-line error."""
    path = os.fspath(path)
    st = _stat(path, what, missing)
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is not a directory, expected a {what}")
    return path


_ROOT_OPTIONS = "eval --image-root, or image_root in a search recipe"


def confined_image(
    name: str, jsonl: str | os.PathLike, where: str, image_root: str | os.PathLike | None = None
) -> Path:
    """The file of an image path `name` read at `where` (e.g. "data.jsonl:3") of `jsonl`.

    Relative paths resolve against the jsonl's directory. Without `image_root` the image must
    be relative and stay inside that directory once symbolic links are resolved; with it the
    image (relative or absolute) must end inside `image_root`. Returns the resolved path of an
    existing regular file; anything else is a `UserError` naming `where` and the path.
    """
    base = os.path.dirname(os.path.abspath(os.fspath(jsonl)))
    p = Path(name)
    if not name:
        raise UserError(f"{where}: empty image path")
    if p.is_absolute() and image_root is None:
        raise UserError(
            f"{where}: image path {name!r} is absolute; without an image root ({_ROOT_OPTIONS}) "
            f"images must lie under the jsonl's directory {base}"
        )
    full = p if p.is_absolute() else Path(base) / p
    if image_root is not None:
        root = os.path.realpath(check_dir(image_root, "image root directory"))
        allowed = f"the image root {root}"
    else:
        root = os.path.realpath(base)
        allowed = f"the jsonl's directory {root} (an image root, {_ROOT_OPTIONS}, admits another)"
    real = os.path.realpath(full)  # links resolved as far as they exist
    if os.path.commonpath([real, root]) != root:
        raise UserError(f"{where}: image path {name!r} resolves to {real}, outside {allowed}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MissingInput(f"{where}: no such image {str(full)!r}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{where}: image {str(full)!r} is a symbolic link loop") from None
        if e.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):
            raise MissingInput(f"{where}: no such image {str(full)!r}") from None
        raise
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{where}: image path {name!r} is a directory, expected an image file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{where}: image path {name!r} is not a regular file")
    return Path(real)


def read_image(path: str | os.PathLike, where: str | None = None) -> np.ndarray:
    """An image file as uint8 [H, W, 3]; a file PIL cannot read is a `UserError`."""

    path = os.fspath(path)
    head = f"{where}: image {path}" if where else path
    if where is None:
        check_file(path, "image")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise UserError(f"{head}: not an image file (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{head}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the machine's failure (permissions, I/O), not the file's content
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{head}: cannot decode the image ({reason})") from None


def check_image_header(path: str | os.PathLike, where: str) -> None:
    """Opens just the header of an image: refuses a file that is not an image, cheaply."""

    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError:
        raise UserError(
            f"{where}: image {os.fspath(path)}: not an image file (PIL cannot identify it)"
        ) from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{where}: image {os.fspath(path)}: {e}") from None


def jsonl_objects(path: str | os.PathLike, what: str = "jsonl file", error=UserError):
    """Yields (line number, where, object) for every non-blank line of a jsonl file.

    `where` is "FILE:LINE" for messages; problems raise `error` (a UserError class) naming it.
    """
    path = check_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
                yield n, where, obj
        except UnicodeDecodeError as e:
            raise error(f"{path}: not UTF-8 text ({e.reason})") from None

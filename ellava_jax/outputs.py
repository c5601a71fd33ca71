"""Where commands write: checked before any work, written whole or not at all, never over
what the project did not write.

- `claim_output` runs before a command's work: it refuses an OUT that holds what ellava did
  not write (unless `--overwrite`), an OUT that is, holds or lies inside an input model, a
  target that cannot be written, and a disk without room for what the run will write.
- `atomic_directory` hands out a temporary directory beside OUT that replaces OUT when the
  block succeeds (with the marker that makes it recognisable later); on an error, Ctrl-C or
  SIGTERM it is removed. Its name carries the writer's process id and start time, so the next
  run removes what a killed run left (never a live run's directory).
- `atomic_file` is the same for one file.

The marker `.ellava-output.json` names the command that wrote a directory.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import sys
import tempfile

from ellava_jax.errors import EnvironmentFailure, UserError

MARKER = ".ellava-output.json"
MARKER_FORMAT = "ellava-jax/output/1"
# JSON files the project writes carry a "format" starting with this.
FORMAT_PREFIX = "ellava-jax/"


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# process identity (leftovers of dead runs)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}.{_start_time(pid) or 0}"


def _owner_alive(tag: str) -> bool:
    pid_s, _, start = tag.partition(".")
    pid = int(pid_s)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return now is None or start == "0" or now == start  # a reused pid started later


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _leftover_re(base: str) -> re.Pattern:
    b = re.escape(base)
    return re.compile(rf"^(?:\.tmp-{b}-(?P<t>\d+\.\d+)-\w+|{b}\.old-(?P<o>\d+\.\d+)-\w+)$")


def clean_leftovers(path: str | os.PathLike, say=_warn) -> list[str]:
    """Removes what killed writers of `path` left beside it; returns the paths handled.

    A temporary directory of a dead writer is removed. A moved-aside old output of a dead
    writer is put back when `path` is missing (the kill fell between the two renames),
    otherwise removed. Directories of live processes are left alone.
    """
    path = os.path.abspath(os.fspath(path)).rstrip("/")
    parent, base = os.path.split(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    pattern, handled = _leftover_re(base), []
    for name in sorted(names):
        m = pattern.match(name)
        if m is None or _owner_alive(m.group("t") or m.group("o")):
            continue
        full = os.path.join(parent, name)
        if m.group("o") and not os.path.lexists(path):
            os.rename(full, path)
            say(f"{path}: restored the previous output that a killed run had moved aside")
        else:
            _remove(full)
            say(f"{full}: removed what a killed run left")
        handled.append(full)
    return handled


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# checks before the work


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def read_marker(directory: str) -> dict | None:
    """The marker of a directory ellava wrote, or None."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == MARKER_FORMAT else None


def write_marker(directory: str, command: str) -> None:
    obj = {
        "format": MARKER_FORMAT,
        "command": command,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(obj, f)


def _is_project_file(path: str) -> bool:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith(FORMAT_PREFIX)


def _first_existing(path: str, shown: str) -> str:
    """The nearest existing ancestor of `path` (itself if it exists); refuses a file on the way."""
    p = path
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if p != path and not os.path.isdir(p):
        raise UserError(f"--out {shown}: cannot create it, {p} is a file, not a directory")
    return p


def _probe_writable(directory: str, shown: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".ellava-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise EnvironmentFailure(
            f"{shown}: cannot write there ({e.strerror or e}); choose another --out"
        ) from None


def add_overwrite_flag(parser) -> None:
    """The `--overwrite` flag of every command that writes an output."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even when it holds files ellava did not write (never an input)",
    )


def weight_bytes(model_dir: str | None) -> int:
    """Bytes of a model directory's weight files (0 for a model built in memory)."""
    if model_dir is None:
        return 0
    return sum(e.stat().st_size for e in os.scandir(model_dir) if e.name.endswith(".safetensors"))


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_existing(path: str, shown: str, command: str, kind: str, overwrite: bool) -> None:
    """Refuses an existing OUT the command may not replace (see `claim_output`)."""
    if kind == "dir" and not os.path.isdir(path):
        if not overwrite:
            raise UserError(
                f"--out {shown}: it is a file, not a directory (pass --overwrite to replace it)"
            )
    elif kind == "file" and os.path.isdir(path):
        raise UserError(f"--out {shown}: it is a directory, expected a file name")
    elif kind == "file" and not overwrite and not _is_project_file(path):
        raise UserError(
            f"--out {shown}: the file exists and ellava did not write it "
            "(pass --overwrite to replace it)"
        )
    elif kind == "dir" and not overwrite:
        try:
            entries = sorted(os.listdir(path))
        except OSError as e:
            raise EnvironmentFailure(f"--out {shown}: cannot read it ({e.strerror})") from None
        marker = read_marker(path)
        if entries and (marker is None or marker.get("command") != command):
            what = (
                f"the output of `ellava {marker.get('command')}`"
                if marker
                else f"files ellava did not write ({', '.join(entries[:3])}"
                + (", ..." if len(entries) > 3 else "")
                + ")"
            )
            raise UserError(
                f"--out {shown}: the directory holds {what}; choose an empty or new "
                f"directory, or pass --overwrite to replace it"
            )


def claim_output(
    out: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    inputs=(),
    models=(),
    need_bytes: int = 0,
    kind: str = "dir",
    in_place: bool = False,
) -> str:
    """Checks `--out` before a command does any work; returns its absolute path.

    Args:
      command: the command's name; a directory marked by the same command may be replaced.
      overwrite: the user's `--overwrite`: replace whatever OUT holds.
      inputs: paths the command reads; OUT may not be one of them nor contain one.
      models: input model directories; OUT may in addition not lie inside one.
      need_bytes: what the run will write, where it can be known (free space is checked).
      kind: "dir" or "file".
      in_place: the command writes into OUT as it goes (search, demo), rather than replacing it.

    Raises:
      UserError: OUT is not the command's to write (exit 2).
      EnvironmentFailure: OUT cannot be written or the disk is too full (exit 1).
    """
    shown = os.fspath(out)
    path = os.path.abspath(shown).rstrip("/") or "/"
    real = _real(path)
    for p in [*inputs, *models]:
        if p is None or not os.path.exists(p):
            continue
        rp = _real(os.fspath(p))
        if _inside(rp, real):
            raise UserError(
                f"--out {shown}: it is or holds the input {p}; writing there would destroy it"
            )
    for m in models:
        if m is not None and os.path.isdir(m) and _inside(real, _real(os.fspath(m))):
            raise UserError(f"--out {shown}: it lies inside the input model {m}; choose another")

    existing = _first_existing(path, shown)
    if existing == path:
        _check_existing(path, shown, command, kind, overwrite)
    clean_leftovers(path)
    if existing != path:
        target = existing  # the nearest ancestor that exists: OUT is created below it
    else:
        target = path if in_place and os.path.isdir(path) else os.path.dirname(path)
    _probe_writable(target, shown)
    if need_bytes:
        free = shutil.disk_usage(target).free
        if free < need_bytes:
            raise EnvironmentFailure(
                f"--out {shown}: this run writes about {gigabytes(need_bytes)} and "
                f"{target} has {gigabytes(free)} free"
            )
    return path


def prepare_in_place(path: str, command: str, overwrite: bool = False) -> None:
    """Creates (or, with `overwrite`, empties) a directory a command writes into as it goes,
    and marks it as the command's."""
    if overwrite and os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            for name in os.listdir(path):
                _remove(os.path.join(path, name))
        else:
            os.remove(path)
    os.makedirs(path, exist_ok=True)
    if read_marker(path) is None:
        write_marker(path, command)


# ---------------------------------------------------------------------------------------------
# writing


def follow_umask(directory: str) -> None:
    """Gives a directory tree the modes the user's umask asks for (mkdtemp makes 0700, and
    some writers, safetensors among them, make their files 0600)."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, command: str | None = None):
    """Yields a temporary directory that replaces `path` when the block succeeds.

    An existing `path` is moved aside first and removed only after the new one is in place;
    on any exception (Ctrl-C and SIGTERM included) the temporary directory is removed. With
    `command`, the result carries the marker naming it. Directories and files take the
    user's umask.
    """
    path = os.path.abspath(os.fspath(path)).rstrip("/")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(path)
    tag = _owner_tag()
    tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-{tag}-", dir=parent)
    try:
        yield tmp
        if command is not None:
            write_marker(tmp, command)
        follow_umask(tmp)
        if os.path.lexists(path):
            old = os.path.join(
                parent, f"{base}.old-{tag}-{os.path.basename(tmp).rsplit('-', 1)[1]}"
            )
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Yields a file object whose content replaces `path` when the block succeeds."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise

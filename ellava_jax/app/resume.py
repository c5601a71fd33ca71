"""What makes a search run directory safe to resume: a lock, and a fingerprint of the settings.

`search.json` in the run directory holds the fingerprint of what changes the result: the model
(its path and the size and modification time of its weight files), the policy space, the
evolution, the fitness and projector settings, the proxy files (path, size, time), the seed.
It leaves out what does not change the result: storage, streaming, calibration chunking,
evaluation settings, and the number of rounds (raising it continues a run). A rerun with
another fingerprint is refused, naming the fields that differ; `--overwrite` starts afresh.

`RunLock` holds an exclusive lock on the run directory for a run's whole life, so two runs on
one directory at once are refused (the lock dies with its process: a killed run holds none).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil

from ellava_jax.app.models import resolve_model_dir
from ellava_jax.errors import UserError

RUN_FILE = "search.json"
RUN_FORMAT = "ellava-jax/search-run/1"
LOCK_FILE = ".search.lock"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"

# Settings that do not change what a search finds (rounds: a run may be continued).
RESULT_FREE = (
    "rounds",
    "database_storage",
    "streaming",
    "row_chunk",
    "candidate_chunk",
    "projector_offload",
    "mesh",
    "calib_batch_size",
    "eval_data",
    "eval_limit",
    "image_root",
)


def _file_identity(path: str | None) -> dict | None:
    if path is None:
        return None
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_identity(spec: str) -> dict:
    """A model by path, and the size and modification time of its config and weight files."""

    d = resolve_model_dir(spec)
    if d is None:
        return {"preset": spec}
    names = sorted(
        n
        for n in os.listdir(d)
        if n == "config.json" or n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
    )
    files = {}
    for n in names:
        ident = _file_identity(os.path.join(d, n))
        files[n] = [ident["size"], ident["mtime_ns"]]
    return {"path": os.path.realpath(d), "files": files}


def fingerprint(settings) -> dict:
    """The settings that change a search's result, with files identified by path, size, time."""
    fp = {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESULT_FREE}
    # settings at their "off" value are left out: a run made before they existed still resumes
    if fp.get("selection") == "full":
        for k in ("selection", "stage_shares", "stage_survivors"):
            fp.pop(k, None)
    if fp.get("projector_samples") is None:
        fp.pop("projector_samples", None)
    fp["model"] = model_identity(settings.model)
    for k in ("proxy_text", "proxy_multimodal"):
        v = getattr(settings, k)
        fp[k] = _file_identity(v) if v is not None and os.path.exists(v) else v
    return json.loads(json.dumps(fp))  # as it reads back from the file


def differing(saved: dict, now: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def _describe(keys: list[str], saved: dict, now: dict) -> str:
    """`p0 0.5 there, 0.4 now; model differs` for the differing fields."""
    parts = []
    for k in keys:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            parts.append(f"{k} differs")
        else:
            parts.append(f"{k} {a!r} there, {b!r} now")
    return "; ".join(parts)


class RunLock:
    """An exclusive, non-blocking lock on a run directory (released when the process ends)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self._f = None

    def __enter__(self):
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the run's life)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            f.close()
            raise UserError(
                f"{os.path.dirname(self.path)}: another ellava search is running there "
                f"(process {who}); wait for it or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def clear(out_dir: str) -> None:
    """Removes everything in a run directory but its lock (`--overwrite`: start afresh)."""
    for name in os.listdir(out_dir):
        if name == LOCK_FILE:
            continue
        p = os.path.join(out_dir, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def rounds_done(out_dir: str) -> int:
    """Rounds with a checkpoint in the run directory (the newest round's number + 1)."""
    d = os.path.join(out_dir, CHECKPOINTS)
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) + 1 if steps else 0


def open_run(out_dir: str, settings, say=print) -> dict | None:
    """Checks a run directory against `settings` before any work.

    Returns the finished run's result when the directory holds a finished search with these
    settings and this many rounds (nothing is recomputed), else None (start or resume).

    Raises:
      UserError: the directory holds a search with other settings (naming them), or more
        rounds than asked for, or checkpoints without a fingerprint.
    """
    now = fingerprint(settings)
    run_path = os.path.join(out_dir, RUN_FILE)
    result_path = os.path.join(out_dir, RESULT_FILE)
    done = rounds_done(out_dir)
    if os.path.exists(run_path):
        try:
            with open(run_path) as f:
                saved = json.load(f)
            if saved.get("format") != RUN_FORMAT:
                raise ValueError(f"format {saved.get('format')!r}")
        except (OSError, ValueError) as e:
            raise UserError(
                f"{run_path}: unreadable ({e}); pass --overwrite to start the search afresh"
            ) from None
        diff = differing(saved["fingerprint"], now)
        if diff:
            raise UserError(
                f"{out_dir}: holds a search with other settings ({_describe(diff, saved['fingerprint'], now)}); "
                "choose another --out, or pass --overwrite to start afresh"
            )
    elif done or os.path.exists(result_path):
        raise UserError(
            f"{out_dir}: holds search results without {RUN_FILE} (an older ellava?), so it "
            "cannot be checked; pass --overwrite to start afresh"
        )
    else:
        tmp = run_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"format": RUN_FORMAT, "fingerprint": now}, f, indent=1)
        os.replace(tmp, run_path)
        return None

    finished = None
    if os.path.exists(result_path):
        try:
            with open(result_path) as f:
                finished = json.load(f)
        except (OSError, ValueError):
            say(f"{result_path}: unreadable; finishing the search again from its checkpoints")
    finished_rounds = finished["settings"]["rounds"] if finished else 0
    if settings.rounds < max(done, finished_rounds):
        raise UserError(
            f"{out_dir}: {max(done, finished_rounds)} rounds of this search are done; "
            f"rounds={settings.rounds} is fewer (raise it to continue, or pass --overwrite)"
        )
    if finished is not None and finished_rounds == settings.rounds:
        say(f"{out_dir}: this search finished earlier; its result is unchanged")
        return finished
    if done:
        say(f"{out_dir}: resuming after round {done} of {settings.rounds}")
    return None

"""Orbax behind small functions: save/restore a pytree (params, masks, search state).

Orbax writes into a temporary directory and renames it when complete, so a killed save never
replaces a good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp


def save_tree(path: str, tree) -> None:
    """Saves a pytree of arrays to `path` (a directory; replaced atomically if it exists)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=True)
        ckptr.wait_until_finished()


def load_tree(path: str, like=None):
    """Restores a pytree; `like` (arrays or ShapeDtypeStructs) fixes structure, shapes and dtypes."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(path)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        return ckptr.restore(path, abstract)


class RoundCheckpoints:
    """One checkpoint per search round under `directory` (the last `keep` kept)."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._mgr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, round_index: int, tree, logs=None) -> None:
        """Saves the round's arrays; `logs` (dataclasses or dicts) go to a JSON file beside them.

        The JSON is written (atomically) before the arrays, so a round whose orbax checkpoint
        exists always has its logs. Several processes: each calls this; process 0 writes the
        JSON, and the arrays (the search's small state, copied to the host) are orbax's.
        """
        if jax.process_count() > 1:
            from ellava_jax.mesh import to_host

            tree = jax.tree.map(to_host, tree)
        if logs is not None and jax.process_index() == 0:
            path = os.path.join(self.directory, f"logs-{round_index}.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(
                    [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in logs], f
                )
            os.replace(tmp, path)
        self._mgr.save(round_index, args=ocp.args.StandardSave(tree))
        self._mgr.wait_until_finished()

    def read_logs(self, round_index: int, cls=None) -> list:
        """The logs saved with a round (as `cls` instances if given)."""
        with open(os.path.join(self.directory, f"logs-{round_index}.json")) as f:
            rows = json.load(f)
        return [cls(**r) for r in rows] if cls is not None else rows

    def restore(self, round_index: int, like=None):
        """A round's arrays: as saved (numpy), or shaped and typed like `like`."""
        if like is None:
            return self._mgr.restore(round_index, args=ocp.args.StandardRestore())
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        return self._mgr.restore(round_index, args=ocp.args.StandardRestore(abstract))

    def latest_intact(self, say=print) -> tuple[int, dict, list] | None:
        """(round, arrays as saved, logs) of the newest round that reads back whole, or None.

        A round whose arrays or logs do not read back (a truncated file, a killed write) is
        deleted, saying so, and the round before it is tried: the search redoes that round.
        """
        for r in sorted(self._mgr.all_steps(), reverse=True):
            try:
                return r, self.restore(r), self.read_logs(r)
            except Exception as e:  # orbax / tensorstore / json raise assorted errors
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                say(
                    f"{self.directory}/{r}: round {r + 1}'s checkpoint is unreadable ({reason}); "
                    "it is removed and the round before it is used"
                )
                self._mgr.delete(r)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, f"logs-{r}.json"))
        return None

    def close(self) -> None:
        self._mgr.close()

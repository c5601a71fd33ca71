"""Several processes (hosts) on one search or prune: `jax.distributed`, and who writes what.

Every process runs the same program (JAX's multi-controller model): the same host code, the
same compiled programs over the global mesh, the same decisions. What differs:

- files: the project's own outputs (result.json, rounds.jsonl, the HF models, masks, plots,
  run markers and locks) are written by process 0 alone; orbax checkpoints are saved by every
  process together (orbax's barriers; each process writes the shards it owns);
- prints: process 0 speaks, the others stay quiet;
- decisions that read the disk (is the run finished, which round resumes, is the output
  directory ours) are taken by process 0 and shared (`agree`): the processes never disagree
  and none waits on a collective another left.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ellava_jax.errors import EnvironmentFailure, UserError

# environment variables by which a cluster tells JAX its processes (jax.distributed detects
# these itself when initialize() gets no arguments)
_CLUSTER_ENV = {
    "JAX_COORDINATOR_ADDRESS": None,
    "SLURM_NTASKS": "count",
    "OMPI_COMM_WORLD_SIZE": "count",
    "TPU_WORKER_HOSTNAMES": "hosts",
}


def add_arguments(p) -> None:
    """--coordinator, --num-processes, --process-id (jax.distributed.initialize's arguments)."""
    g = p.add_argument_group(
        "several hosts",
        "one process per host, all with the same command and --process-id 0..N-1; without "
        "these flags SLURM's or Open MPI's environment is detected, else one process",
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address; 'auto': JAX finds the cluster itself (a TPU pod slice, GKE, "
        "SLURM, Open MPI), no other flag needed",
    )
    g.add_argument("--num-processes", type=int, default=None, metavar="N")
    g.add_argument("--process-id", type=int, default=None, metavar="I")


def _cluster_detected() -> bool:
    for name, kind in _CLUSTER_ENV.items():
        value = os.environ.get(name)
        if not value:
            continue
        if kind is None:
            return True
        if kind == "count" and value.isdigit() and int(value) > 1:
            return True
        if kind == "hosts" and "," in value:
            return True
    return False


def initialize(args) -> None:
    """Joins the processes named by the flags (or the cluster's environment); one process when
    neither says otherwise. Must run before anything touches a JAX device."""
    given = {
        "--coordinator": args.coordinator,
        "--num-processes": args.num_processes,
        "--process-id": args.process_id,
    }
    named = [k for k, v in given.items() if v is not None]
    auto = args.coordinator == "auto"
    if auto and len(named) > 1:
        raise UserError(
            "--coordinator auto finds the processes itself: drop --num-processes, --process-id"
        )
    if named and len(named) < 3 and not auto:
        missing = ", ".join(k for k in given if k not in named)
        raise UserError(f"{', '.join(named)} given without {missing}: several hosts need all three")
    if not named and not _cluster_detected():
        return
    import jax

    if named and not auto:
        n, i = args.num_processes, args.process_id
        if n < 1:
            raise UserError(f"--num-processes {n}: expected a positive integer")
        if not 0 <= i < n:
            raise UserError(f"--process-id {i}: expected 0..{n - 1} (--num-processes {n})")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
        kwargs = dict(coordinator_address=args.coordinator, num_processes=n, process_id=i)
    else:
        kwargs = {}
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise EnvironmentFailure(f"jax.distributed.initialize failed: {line}") from None


def process_count() -> int:
    import jax

    return jax.process_count()


def is_main() -> bool:
    """True in process 0 (and in a run of one process): the one that writes and speaks."""
    import jax

    return jax.process_index() == 0


def quiet(say):
    """`say` in process 0; a no-op elsewhere."""
    return say if is_main() else (lambda *a, **k: None)


def _broadcast_bytes(data: bytes) -> bytes:
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buf = np.zeros(max(n, 1), np.uint8)
    if is_main():
        buf[:n] = np.frombuffer(data, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n])


def agree(fn):
    """fn() in process 0, its result (JSON) or its error (a UserError or EnvironmentFailure,
    the same line) in every process. One process: fn() as it is."""
    if process_count() == 1:
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = {"value": fn()}
        except UserError as e:
            outcome = {"user_error": str(e)}
        except EnvironmentFailure as e:
            outcome = {"failure": str(e)}
    outcome = json.loads(_broadcast_bytes(json.dumps(outcome).encode()))
    if "user_error" in outcome:
        raise UserError(outcome["user_error"])
    if "failure" in outcome:
        raise EnvironmentFailure(outcome["failure"])
    return outcome["value"]


def barrier(name: str) -> None:
    """Every process waits here for the others (no-op with one)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

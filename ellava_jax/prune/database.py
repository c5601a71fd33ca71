"""The level database: every decoder linear pruned once per grid level, with dense Hessians.

A search candidate is then assembled by lookup: its kernel for (layer, matrix) is
`stacks[matrix][layer, level]` (`kernel(layer, matrix, level)`). No candidate ever re-runs OBS; building the database takes
levels x matrices OBS prunings (a level of 0 stores the dense kernel without one); the levels
of one matrix run as one vmapped call, sharing the factorisation of its Hessian.

Storage follows size: on the accelerator (default, the toy and anything that fits), or on host
memory (`where="host"`), from where the fitness streams one layer at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.mesh import to_device
from ellava_jax.prune.hessian import MATRIX_GROUP, CalibrationSet, calibrate
from ellava_jax.prune.masks import MATRICES, get_path, kernel_path
from ellava_jax.prune.obs import sparsegpt

log = logging.getLogger(__name__)


@dataclass
class LevelDatabase:
    """Pruned kernels per matrix, stacked over layers and levels: [L, K, in, out] (the layout
    of the scanned decoder: a scan over layers hands each step one layer's [K, in, out])."""

    levels: np.ndarray
    stacks: dict[str, jax.Array | np.ndarray]  # matrix -> [L, K, in, out]
    # log(||W_level||_F / ||W_dense||_F) per (layer, matrix): [K]
    log_norm_ratio: dict[tuple[int, str], np.ndarray]
    pruner_calls: int = 0
    seconds: float = 0.0
    per_layer_seconds: list = field(default_factory=list)
    # how stacks reach the device: {m: array} -> {m: device array} (a mesh shards them:
    # `mesh.shard_kernels`); None: onto the default device as they are
    place: Callable[[dict], dict] | None = None

    def _on_device(self, stacks: dict) -> dict:
        if self.place is not None:
            return self.place(stacks)
        return {m: jnp.asarray(x) for m, x in stacks.items()}

    @property
    def n_matrices(self) -> int:
        return len(self.log_norm_ratio)

    def kernel(self, layer: int, matrix: str, level: int | None = None):
        """One matrix's [K, in, out] level stack, or its [in, out] kernel at `level`."""
        stack = self.stacks[matrix][layer]
        return stack if level is None else stack[level]

    def layer_kernels(self, layer: int) -> dict[str, jax.Array]:
        """The seven [K, in, out] stacks of one layer (moved to the device if on host)."""
        return self._on_device({m: self.stacks[m][layer] for m in MATRICES})

    def device_stacks(self) -> dict[str, jax.Array]:
        """Every [L, K, in, out] stack on the device (copied there when on host)."""
        return self._on_device(dict(self.stacks))

    def log_norm_table(self, order: list[tuple[int, str]]) -> np.ndarray:
        """[n_matrices, K] table of log norm ratios, rows in `order`."""
        return np.stack([self.log_norm_ratio[k] for k in order])


@jax.jit
def _prune_levels(kernel, hessian, sparsities):
    """SparseGPT at several sparsities, one after another in one program: [K] -> [K, in, out].

    `lax.map`, not `vmap`: XLA:CPU (jax 0.10.2) fails to compile the vmapped kernel when the
    input width is not a multiple of the 128-column block (576, SmolLM2's hidden size: "Failed
    to translate module to LLVM IR"), and the sequential map was no slower where both ran
    (2048 x 2048, 5 levels: 2.0-2.7 s against 2.8-3.8 s on 2 cores).
    """
    return jax.lax.map(lambda s: sparsegpt(kernel, hessian, s)[0], sparsities)


@jax.jit
def _level_stack(dense, pruned, take):
    """[K, in, out]: the dense kernel where a level is 0, else that level's pruned kernel (one
    program: no Python iteration over a device array, which on a mesh costs a program per row)."""
    return jnp.concatenate([dense[None], pruned])[take]


def build_database(
    config: LlavaConfig,
    params: dict,
    calib: CalibrationSet,
    levels,
    *,
    where: str = "device",
    batch_size: int = 8,
    progress: bool = True,
    devices=None,
) -> LevelDatabase:
    """Prunes every decoder linear at every level with SparseGPT and dense-model Hessians.

    Args:
      levels: the grid of sparsities (e.g. `PolicySpace.levels`).
      where: "device" keeps the stacks as device arrays, "host" as numpy arrays.
      devices: a mesh's devices: each matrix's OBS runs whole on one of them, a layer's seven
        matrices on seven devices at once (not partitioned: SparseGPT's column loop would
        exchange data at every step); the stacks are placed on the mesh afterwards.
    """
    if where not in ("device", "host"):
        raise ValueError(f"database storage {where!r}: expected 'device' or 'host'")
    levels = np.asarray(levels, np.float64)
    kernels, norms = {m: [] for m in MATRICES}, {}
    calls = 0
    t_start = time.perf_counter()
    per_layer = []

    pruned_levels = [float(x) for x in levels if x > 0]
    # each level's row of [dense, pruned levels...]: 0 for a level of 0 (the dense kernel)
    take = jnp.asarray(np.cumsum(levels > 0) * (levels > 0), jnp.int32)
    sp = jnp.asarray(pruned_levels, jnp.float32)

    def on_layer(i, lp, hess):
        nonlocal calls
        t0 = time.perf_counter()
        for j, m in enumerate(MATRICES):
            w = get_path(lp, kernel_path(i, m)[3:])  # lp: layer i's own tree
            h = hess[MATRIX_GROUP[m]]
            if devices:  # matrix j's OBS whole on one device; the seven run side by side
                w, h = (to_device(x, devices[j % len(devices)]) for x in (w, h))
            dense_norm = float(jnp.linalg.norm(w.astype(jnp.float32)))
            # every level of one matrix in one call: the Hessian's factorisation is shared
            pruned = _prune_levels(w, h, sp)
            calls += len(pruned_levels)
            stack = _level_stack(w, pruned, take)
            flat = stack.astype(jnp.float32).reshape(len(levels), -1)
            ratios = jnp.linalg.norm(flat, axis=1) / dense_norm
            norms[(i, m)] = np.log(np.maximum(np.asarray(ratios, np.float64), 1e-30))
            kernels[m].append(stack if where == "device" else np.asarray(stack))
        per_layer.append(time.perf_counter() - t0)
        return None  # dense mode: the model is not changed

    calibrate(
        config, params, calib, on_layer, mode="dense", batch_size=batch_size, progress=progress
    )
    stack = jnp.stack if where == "device" else np.stack
    stacks = {}
    for m in MATRICES:  # one matrix at a time: the transient copy is one matrix's levels
        stacks[m] = stack(kernels[m])
        kernels[m].clear()
    db = LevelDatabase(levels, stacks, norms, calls, time.perf_counter() - t_start, per_layer)
    log.info(
        "level database: %d OBS calls (%d levels x %d matrices, dense levels skipped) in %.1f s",
        calls,
        len(levels),
        db.n_matrices,
        db.seconds,
    )
    return db

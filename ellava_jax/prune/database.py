"""The level database: every decoder linear pruned once per grid level, with dense Hessians.

A search candidate is then assembled by lookup: its kernel for (layer, matrix) is
`kernels[(layer, matrix)][level]`. No candidate ever re-runs OBS; building the database takes
levels x matrices OBS prunings (a level of 0 stores the dense kernel without one); the levels
of one matrix run as one vmapped call, sharing the factorisation of its Hessian.

Storage follows size: on the accelerator (default, the toy and anything that fits), or on host
memory (`where="host"`), from where the fitness streams one layer at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.prune.hessian import MATRIX_GROUP, CalibrationSet, calibrate
from ellava_jax.prune.masks import MATRICES, get_path, kernel_path
from ellava_jax.prune.obs import sparsegpt

log = logging.getLogger(__name__)


@dataclass
class LevelDatabase:
    """Pruned kernels per (layer, matrix), stacked over levels: [K, in, out]."""

    levels: np.ndarray
    kernels: dict[tuple[int, str], jax.Array | np.ndarray]
    # log(||W_level||_F / ||W_dense||_F) per (layer, matrix): [K]
    log_norm_ratio: dict[tuple[int, str], np.ndarray]
    pruner_calls: int = 0
    seconds: float = 0.0
    per_layer_seconds: list = field(default_factory=list)

    def layer_kernels(self, layer: int) -> dict[str, jax.Array]:
        """The seven [K, in, out] stacks of one layer (moved to the device if on host)."""
        return {m: jnp.asarray(self.kernels[(layer, m)]) for m in MATRICES}

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


def build_database(
    config: LlavaConfig,
    params: dict,
    calib: CalibrationSet,
    levels,
    *,
    where: str = "device",
    batch_size: int = 8,
    progress: bool = True,
) -> LevelDatabase:
    """Prunes every decoder linear at every level with SparseGPT and dense-model Hessians.

    Args:
      levels: the grid of sparsities (e.g. `PolicySpace.levels`).
      where: "device" keeps the stacks as device arrays, "host" as numpy arrays.
    """
    if where not in ("device", "host"):
        raise ValueError(f"database storage {where!r}: expected 'device' or 'host'")
    levels = np.asarray(levels, np.float64)
    kernels, norms = {}, {}
    calls = 0
    t_start = time.perf_counter()
    per_layer = []

    pruned_levels = [float(x) for x in levels if x > 0]

    def on_layer(i, lp, hess):
        nonlocal calls
        t0 = time.perf_counter()
        for m in MATRICES:
            w = get_path(lp, kernel_path(i, m)[3:])
            dense_norm = float(jnp.linalg.norm(w.astype(jnp.float32)))
            # every level of one matrix in one call: the Hessian's factorisation is shared
            sp = jnp.asarray(pruned_levels, jnp.float32)
            pruned = iter(_prune_levels(w, hess[MATRIX_GROUP[m]], sp))
            calls += len(pruned_levels)
            stack = jnp.stack([w if s <= 0 else next(pruned) for s in levels])
            flat = stack.astype(jnp.float32).reshape(len(levels), -1)
            ratios = jnp.linalg.norm(flat, axis=1) / dense_norm
            norms[(i, m)] = np.log(np.maximum(np.asarray(ratios, np.float64), 1e-30))
            kernels[(i, m)] = stack if where == "device" else np.asarray(stack)
        per_layer.append(time.perf_counter() - t0)
        return None  # dense mode: the model is not changed

    calibrate(
        config, params, calib, on_layer, mode="dense", batch_size=batch_size, progress=progress
    )
    db = LevelDatabase(levels, kernels, norms, calls, time.perf_counter() - t_start, per_layer)
    log.info(
        "level database: %d OBS calls (%d levels x %d matrices, dense levels skipped) in %.1f s",
        calls,
        len(levels),
        len(kernels),
        db.seconds,
    )
    return db

"""The policy space: per-layer (or per-matrix) sparsity levels on a grid, kept within the budget.

A policy is a vector of level indices into the grid p0 - width : step : p0 + width (5 levels by
default). Its parameter-weighted mean sparsity must lie within p0 +- tol; a candidate outside is
repaired one grid step at a time, never discarded. The evolution works on a continuous genome
(level-index units); `decode` rounds it to levels and repairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import UserError
from ellava_jax.prune.masks import MATRICES, decoder_linears, matrix_size


@dataclass(frozen=True)
class PolicySpace:
    """Grid levels, entries (layers or matrices) and their parameter weights."""

    config: LlavaConfig
    p0: float
    granularity: str = "layer"  # or "matrix"
    step: float = 0.05
    width: float = 0.1
    tol: float = 0.01

    def __post_init__(self):
        if self.granularity not in ("layer", "matrix"):
            raise UserError(
                f"policy granularity {self.granularity!r}: expected 'layer' or 'matrix'"
            )
        if not 0.0 < self.p0 < 1.0:
            raise UserError(f"target sparsity p0={self.p0} must be in (0, 1)")
        lv = self.levels
        if lv[0] < 0 or lv[-1] >= 1:
            raise UserError(
                f"grid {lv.round(3).tolist()} leaves [0, 1): choose another p0 or width"
            )

    @cached_property
    def levels(self) -> np.ndarray:
        n = int(round(self.width / self.step))
        return np.round(self.p0 + self.step * np.arange(-n, n + 1), 6)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @cached_property
    def entry_names(self) -> list[str]:
        if self.granularity == "layer":
            return [str(i) for i in range(self.config.text.num_hidden_layers)]
        return [f"{layer}.{m}" for layer, m in decoder_linears(self.config)]

    @property
    def n_entries(self) -> int:
        return len(self.entry_names)

    @cached_property
    def weights(self) -> np.ndarray:
        """Parameter count of each entry, normalised to sum to 1."""
        if self.granularity == "layer":
            per_layer = sum(matrix_size(self.config, m) for m in MATRICES)
            w = np.full(self.n_entries, float(per_layer))
        else:
            w = np.array(
                [float(matrix_size(self.config, m)) for _, m in decoder_linears(self.config)]
            )
        return w / w.sum()

    def entry_of(self, layer: int, matrix: str) -> int:
        """Index of the entry that sets the sparsity of (layer, matrix)."""
        return (
            layer if self.granularity == "layer" else layer * len(MATRICES) + MATRICES.index(matrix)
        )

    # -- budget ---------------------------------------------------------------------------------

    def mean_sparsity(self, idx) -> np.ndarray:
        """Parameter-weighted mean sparsity of level indices [..., E]."""
        return self.levels[np.asarray(idx)] @ self.weights

    def is_valid(self, idx) -> np.ndarray:
        return np.abs(self.mean_sparsity(idx) - self.p0) <= self.tol + 1e-9

    def repair(self, idx, rng: np.random.Generator) -> np.ndarray:
        """Moves random entries one grid step towards the budget until the mean is within p0 +- tol.

        Each move steps down an entry above the bottom level (mean too high) or up one below the
        top (mean too low); entries are drawn from `rng`, so repair is deterministic by seed.
        """
        idx = np.array(idx, dtype=np.int32).copy()
        for _ in range(10 * self.n_entries * self.n_levels):
            mean = float(self.mean_sparsity(idx))
            if abs(mean - self.p0) <= self.tol + 1e-9:
                return idx
            step = -1 if mean > self.p0 else 1
            movable = np.nonzero((idx > 0) if step < 0 else (idx < self.n_levels - 1))[0]
            new_means = mean + step * self.step * self.weights[movable]
            # moves that land in the window or stay on this side: the distance only shrinks
            ok = movable[
                (np.abs(new_means - self.p0) <= self.tol)
                | ((new_means - self.p0) * (mean - self.p0) > 0)
            ]
            if len(ok):
                j = ok[rng.integers(len(ok))]
            else:  # every move overshoots: take the one that lands closest
                j = movable[np.argmin(np.abs(new_means - self.p0))]
            idx[j] += step
        raise RuntimeError(f"could not repair policy to p0={self.p0} +- {self.tol}: {idx.tolist()}")

    # -- genome ---------------------------------------------------------------------------------

    def decode(self, genome, rng: np.random.Generator) -> np.ndarray:
        """Continuous genome [E] (level-index units, centre = middle level) -> valid level indices."""
        idx = np.clip(np.rint(np.asarray(genome, np.float64)), 0, self.n_levels - 1).astype(
            np.int32
        )
        return self.repair(idx, rng)

    def encode(self, idx) -> np.ndarray:
        return np.asarray(idx, np.float32)

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n valid policies drawn uniformly over the grid, then repaired: [n, E]."""
        return np.stack(
            [self.repair(rng.integers(0, self.n_levels, self.n_entries), rng) for _ in range(n)]
        )

    def uniform(self) -> np.ndarray:
        return np.full(self.n_entries, self.n_levels // 2, np.int32)

    # -- views ----------------------------------------------------------------------------------

    def sparsities(self, idx) -> list[float]:
        return [float(x) for x in self.levels[np.asarray(idx)]]

    def index_of(self, sparsities) -> np.ndarray | None:
        """The inverse of `sparsities`: level indices [E] of per-entry sparsities, or None
        where they are not E values on the grid that keep the budget (a policy of another
        space, or a method's own ratios such as OWL's)."""
        s = np.asarray(sparsities, np.float64)
        lv = self.levels
        idx = np.rint((s - lv[0]) / (lv[1] - lv[0])).astype(np.int32)
        if s.shape != (self.n_entries,) or (idx < 0).any() or (idx >= self.n_levels).any():
            return None
        if not np.allclose(lv[idx], s) or not self.is_valid(idx):
            return None
        return idx

    def per_matrix(self, idx) -> dict[tuple[int, str], float]:
        """{(layer, matrix): sparsity} for `prune_model`."""
        lv = self.levels[np.asarray(idx)]
        return {
            (layer, m): float(lv[self.entry_of(layer, m)])
            for layer, m in decoder_linears(self.config)
        }

    def as_policy(self, idx):
        """The JSON policy form that `ellava prune --policy` reads."""
        s = self.sparsities(idx)
        if self.granularity == "layer":
            return s
        k = len(MATRICES)
        return [s[i * k : (i + 1) * k] for i in range(self.config.text.num_hidden_layers)]

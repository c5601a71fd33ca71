"""Minimal pruning baselines on one Flax kernel ``[in, out]``: magnitude and Wanda.

Both return ``(pruned_kernel, mask)`` with ``mask`` boolean ``[in, out]``, True = kept, and
accept N:M (``prune_n`` pruned out of every ``prune_m`` consecutive inputs, per output).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["magnitude_prune", "wanda_prune"]


def _prune_lowest(score: jax.Array, sparsity, axis: int | None) -> jax.Array:
    """True = pruned: the ``floor(sparsity * size)`` lowest scores over the whole matrix
    (``axis=None``) or along ``axis`` (same count in every slice). Ties: lower index first."""
    if axis is None:
        flat = score.reshape(-1)
        k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * flat.size).astype(jnp.int32)
        rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
        return (rank < k).reshape(score.shape)
    size = score.shape[axis]
    k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)
    rank = jnp.argsort(jnp.argsort(score, axis=axis, stable=True), axis=axis, stable=True)
    return rank < k


def _prune_n_of_m(score: jax.Array, n: int, m: int) -> jax.Array:
    """True = pruned: the ``n`` lowest scores in every group of ``m`` consecutive rows."""
    rows, cols = score.shape
    if rows % m:
        raise ValueError(f"in={rows} is not a multiple of M={m}")
    groups = score.reshape(rows // m, m, cols)
    rank = jnp.argsort(jnp.argsort(groups, axis=1, stable=True), axis=1, stable=True)
    return (rank < n).reshape(rows, cols)


def _apply(kernel: jax.Array, pruned: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.where(pruned, jnp.zeros((), kernel.dtype), kernel), ~pruned


def magnitude_prune(
    kernel: jax.Array, sparsity=0.5, *, prune_n: int = 0, prune_m: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Prune the smallest ``|W|`` over the whole matrix (or N:M per output)."""
    score = jnp.abs(kernel.astype(jnp.float32))
    if prune_n:
        return _apply(kernel, _prune_n_of_m(score, prune_n, prune_m))
    return _apply(kernel, _prune_lowest(score, sparsity, None))


def wanda_prune(
    kernel: jax.Array,
    input_norms: jax.Array,
    sparsity=0.5,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Wanda (Sun et al. 2023): score ``|W_ij| * ||X_i||_2``, compared within each output
    column of the ``[in, out]`` kernel (= each output row of torch's W), or N:M per output.

    ``input_norms[in]`` is the L2 norm of each input feature over the calibration tokens
    (``sqrt(diag(X^T X))``; from a Hessian ``H = (2/n) X^T X`` use ``sqrt(diag(H) * n / 2)``,
    any positive scale gives the same mask).
    """
    score = jnp.abs(kernel.astype(jnp.float32)) * input_norms.astype(jnp.float32)[:, None]
    if prune_n:
        return _apply(kernel, _prune_n_of_m(score, prune_n, prune_m))
    return _apply(kernel, _prune_lowest(score, sparsity, 0))

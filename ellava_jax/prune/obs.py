"""Block-wise OBS pruning of one linear kernel (SparseGPT), in JAX.

The semantics are SparseGPT's (Frantar & Alistarh 2023, `fasterprune`) and llm-compressor's
`sparsify_weight`; see docs/architecture.md and DESIGN.md "Pruning (SparseGPT / OBS)".

Layout: a Flax kernel is ``[in, out]``, the transpose of torch's ``W[out, in]``. An OBS "column"
(one input feature) is therefore one contiguous *row* of the kernel, and all per-column work
below is a row operation on a ``[rows, out]`` slab.

Algorithm (torch notation W[out, n], H[n, n]):

* dead inputs (``H_jj == 0``) get ``H_jj = 1`` and ``W[:, j] = 0``; damping
  ``lambda = percdamp * mean(diag H)``;
* ``U`` is the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``). We never form ``H^-1``:
  with ``H = R R^T``, ``R`` upper triangular (a Cholesky factorisation of the index-reversed
  ``H``), ``U = R^-1``. Only the ``blocksize`` x ``blocksize`` diagonal blocks of ``U`` are
  inverted explicitly;
* columns are processed in blocks of ``blocksize``. Inside a block the unstructured mask is
  chosen jointly over the block: the ``k`` smallest ``w^2 / U_jj^2`` with
  ``k = floor(sparsity * elements of the block)``; for N:M, the N smallest per output row in
  each group of M consecutive inputs, chosen when the group is reached. Each pruned column's
  error ``e_j = (w_j - q_j) / U_jj`` is spread onto the remaining columns of the block
  (``W[:, j:] -= e_j U[j, j:]``);
* the block's error reaches later columns. SparseGPT applies ``W[:, later] -= E_b U[b, later]``
  right after each block. Writing ``D = W_orig - Q`` for the final change of the processed
  columns, the identity ``W_orig - Q = E U`` gives the *current* value of block ``b`` directly:
  ``W_b = W_orig_b + (D_{<b} R[<b, b]) U[b, b]``. We use this left-looking form: it needs the
  Cholesky factor ``R`` only (no full inverse: a third of the factorisation FLOPs of
  cholesky + cholesky_inverse + cholesky), and each block reads the earlier changes once.

Speed structure (all static shapes, one compilation per (shape, prune_n, prune_m, blocksize);
``sparsity`` and ``percdamp`` are traced):

* the rows are padded to a multiple of ``blocksize`` (padding = dead inputs, excluded from the
  mask count);
* the blocks are grouped in a few *chunks*. At a chunk start one matmul brings in the changes of
  all earlier chunks; inside a chunk a ``lax.scan`` over its blocks contracts over the chunk's
  rows only (so the wasted work of static shapes is bounded by one chunk);
* inside a block, sub-blocks of ``subblock`` rows: a ``lax.fori_loop`` over columns updates only
  the ``[subblock, out]`` slab, then one matmul carries the sub-block's error to the rest of the
  block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

__all__ = ["sparsegpt", "trace_count"]

_F32 = jnp.float32
_MAX_DAMP_TRIES = 8  # damping x10 per try: up to 1e8 x the requested damping
_INF_BITS = 0x7F800000  # bit pattern of +inf in float32

_TRACES = {"sparsegpt": 0}


def trace_count() -> int:
    """How many times the jitted SparseGPT kernel has been traced (compiled) in this process."""
    return _TRACES["sparsegpt"]


# --------------------------------------------------------------------------------------------
# Factorisation


def _reverse_cholesky(h: jax.Array) -> jax.Array:
    """Upper-triangular ``r`` with ``h = r @ r.T`` (NaN where ``h`` is not positive definite)."""
    return jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]


def _damped_factor(h: jax.Array, damp0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Factor ``h + damp I``, retrying with 10x the damping while it is not positive definite.

    Returns ``(r, ok)``; when every try failed ``r`` is the identity (no error propagation,
    scores become plain magnitudes: llm-compressor's fallback) and ``ok`` is False.
    """
    n = h.shape[0]
    idx = jnp.arange(n)

    def factor(damp):
        return _reverse_cholesky(h.at[idx, idx].add(damp))

    def finite(r):
        return jnp.all(jnp.isfinite(r))

    def cond(state):
        r, _, tries = state
        return jnp.logical_and(~finite(r), tries < _MAX_DAMP_TRIES)

    def body(state):
        _, damp, tries = state
        damp = damp * 10.0
        return factor(damp), damp, tries + 1

    r, _, _ = lax.while_loop(cond, body, (factor(damp0), damp0, jnp.int32(0)))
    ok = finite(r)
    return jnp.where(ok, r, jnp.eye(n, dtype=r.dtype)), ok


# --------------------------------------------------------------------------------------------
# Masks (True = pruned inside this module; the public function returns True = kept)


def _smallest_k(score: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask of exactly ``k`` smallest entries of a non-negative ``score`` (ties: first
    in row-major order). ``score`` may hold +inf for entries that must not be chosen."""
    bits = lax.bitcast_convert_type(score, jnp.int32)  # monotone for non-negative floats

    # smallest t with count(bits <= t) >= k, by bisection on the bit pattern
    def bisect(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    t, _ = lax.fori_loop(0, 32, bisect, (jnp.int32(0), jnp.int32(_INF_BITS)))
    below = bits < t
    tied = bits == t
    need = k - jnp.sum(below, dtype=jnp.int32)  # how many of the tied entries to take
    n_tied = jnp.sum(tied, dtype=jnp.int32)
    flat = lax.broadcasted_iota(jnp.int32, score.shape, 0) * score.shape[1] + (
        lax.broadcasted_iota(jnp.int32, score.shape, 1)
    )

    def first_tied(_):
        # smallest j with count(tied & flat < j) >= need
        def bisect_idx(_, lohi):
            lo, hi = lohi
            mid = lo + (hi - lo) // 2
            enough = jnp.sum(tied & (flat < mid), dtype=jnp.int32) >= need
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        nbits = max(1, math.ceil(math.log2(score.size + 1)) + 1)
        j, _ = lax.fori_loop(0, nbits, bisect_idx, (jnp.int32(0), jnp.int32(score.size)))
        return tied & (flat < j)

    take = lax.cond(need >= n_tied, lambda _: tied, first_tied, None)
    return below | take


def _smallest_n_of_group(score: jax.Array, n: int) -> jax.Array:
    """``score[m, out]``: mask of the ``n`` smallest in each column (ties: lower row first)."""
    m = score.shape[0]
    rank = jnp.zeros(score.shape, jnp.int32)
    for a in range(m):
        for b in range(m):
            if a == b:
                continue
            before = score[b] <= score[a] if b < a else score[b] < score[a]
            rank = rank.at[a].add(before.astype(jnp.int32))
    return rank < n


# --------------------------------------------------------------------------------------------
# One block


def _prune_block(w, u, valid, sparsity, *, prune_n, prune_m, subblock):
    """OBS on one block. ``w[B, out]`` current values, ``u[B, B]`` the upper Cholesky factor of
    the block's inverse Hessian, ``valid[B]`` False on padding rows. Returns ``(q, pruned)``."""
    nrow, nout = w.shape
    d = jnp.diagonal(u)
    inv_d = 1.0 / d
    if prune_n == 0:
        score = jnp.square(w * inv_d[:, None])
        score = jnp.where(valid[:, None], score, jnp.inf)
        count = jnp.sum(valid, dtype=jnp.int32) * nout
        k = jnp.floor(count.astype(_F32) * sparsity).astype(jnp.int32)
        pruned = _smallest_k(score, jnp.clip(k, 0, count))
        group = 1
    else:
        pruned = jnp.zeros(w.shape, bool)
        group = prune_m

    for s0 in range(0, nrow, subblock):
        s1 = s0 + subblock
        ws, us, inv_ds = w[s0:s1], u[s0:s1, s0:s1], inv_d[s0:s1]
        ps = pruned[s0:s1]
        es = jnp.zeros_like(ws)

        def group_step(g, carry, us=us, inv_ds=inv_ds):
            ws, ps, es = carry
            r0 = g * group
            if prune_n:
                rows = lax.dynamic_slice_in_dim(ws, r0, group, 0)
                sc = jnp.square(rows * lax.dynamic_slice_in_dim(inv_ds, r0, group)[:, None])
                ps = lax.dynamic_update_slice_in_dim(ps, _smallest_n_of_group(sc, prune_n), r0, 0)
            for t in range(group):
                i = r0 + t
                row = lax.dynamic_index_in_dim(ws, i, 0, keepdims=False)
                p = lax.dynamic_index_in_dim(ps, i, 0, keepdims=False)
                e = jnp.where(p, row, 0.0) * lax.dynamic_index_in_dim(inv_ds, i, 0, False)
                urow = lax.dynamic_index_in_dim(us, i, 0, keepdims=False)
                ws = ws - urow[:, None] * e[None, :]
                es = lax.dynamic_update_index_in_dim(es, e, i, 0)
            return ws, ps, es

        unroll = max(1, 8 // group)
        ws, ps, es = lax.fori_loop(0, subblock // group, group_step, (ws, ps, es), unroll=unroll)
        w = w.at[s0:s1].set(ws)
        if prune_n:
            pruned = pruned.at[s0:s1].set(ps)
        if s1 < nrow:
            w = w.at[s1:].add(-(u[s0:s1, s1:].T @ es))
    q = jnp.where(pruned, 0.0, w)
    return q, pruned


# --------------------------------------------------------------------------------------------
# The jitted kernel


@functools.partial(
    jax.jit, static_argnames=("prune_n", "prune_m", "blocksize", "subblock", "chunks")
)
def _sparsegpt_jit(kernel, hessian, sparsity, percdamp, *, prune_n, prune_m, blocksize, subblock,
                   chunks):
    _TRACES["sparsegpt"] += 1
    n, nout = kernel.shape
    bsz = blocksize
    nb = -(-n // bsz)
    npad = nb * bsz

    w = kernel.astype(_F32)
    h = hessian.astype(_F32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    idx = jnp.arange(n)
    h = h.at[idx, idx].set(jnp.where(dead, 1.0, diag))
    w = jnp.where(dead[:, None], 0.0, w)
    mean_diag = jnp.mean(jnp.diagonal(h))
    damp0 = percdamp * mean_diag
    # a Hessian without a usable scale (all-negative diagonal, zero damping): still damp it
    damp0 = jnp.where(jnp.isfinite(damp0) & (damp0 > 0), damp0, jnp.maximum(percdamp, 1e-6))

    if npad > n:  # padding rows are dead inputs: identity Hessian block, zero weights
        h = jnp.pad(h, ((0, npad - n), (0, npad - n)))
        pidx = jnp.arange(n, npad)
        h = h.at[pidx, pidx].set(1.0)
        w = jnp.pad(w, ((0, npad - n), (0, 0)))
    valid = (jnp.arange(npad) < n).reshape(nb, bsz)

    r, _ = _damped_factor(h, damp0)

    # diagonal blocks of R and of U = R^-1
    r4 = r.reshape(nb, bsz, nb, bsz)
    rdiag = jnp.moveaxis(jnp.diagonal(r4, axis1=0, axis2=2), -1, 0)  # [nb, B, B]
    eye = jnp.broadcast_to(jnp.eye(bsz, dtype=_F32), rdiag.shape)
    udiag = solve_triangular(rdiag, eye, lower=False)

    prune_block = functools.partial(
        _prune_block, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, subblock=subblock
    )

    per_chunk = -(-nb // chunks)
    d_chunks = []  # (row0, row1, D rows) of finished chunks
    q_out, m_out = [], []
    for b0 in range(0, nb, per_chunk):
        b1 = min(nb, b0 + per_chunk)
        r0, r1 = b0 * bsz, b1 * bsz
        nbc, rows = b1 - b0, r1 - r0
        # changes of all earlier chunks, for every row of this chunk: C = R[prev, chunk]^T D_prev
        corr = jnp.zeros((rows, nout), _F32)
        for p0, p1, dp in d_chunks:
            corr = corr + r[p0:p1, r0:r1].T @ dp
        rcols = r[r0:r1, r0:r1].reshape(rows, nbc, bsz).transpose(1, 0, 2)  # [nbc, rows, B]
        xs = (
            jnp.arange(nbc),
            w[r0:r1].reshape(nbc, bsz, nout),
            corr.reshape(nbc, bsz, nout),
            rcols,
            udiag[b0:b1],
            valid[b0:b1],
        )

        def step(dchunk, x):
            j, wb, cb, rc, ub, vb = x
            cb = cb + rc.T @ dchunk  # changes of the earlier blocks of this chunk
            wcur = wb + ub.T @ cb
            q, pruned = prune_block(wcur, ub, vb)
            dchunk = lax.dynamic_update_slice_in_dim(dchunk, wb - q, j * bsz, 0)
            return dchunk, (q, pruned)

        dchunk, (q, pruned) = lax.scan(step, jnp.zeros((rows, nout), _F32), xs)
        d_chunks.append((r0, r1, dchunk))
        q_out.append(q.reshape(rows, nout))
        m_out.append(pruned.reshape(rows, nout))

    q = jnp.concatenate(q_out, 0)[:n]
    kept = ~jnp.concatenate(m_out, 0)[:n]
    return q.astype(kernel.dtype), kept


def sparsegpt(
    kernel: jax.Array,
    hessian: jax.Array,
    sparsity: float | jax.Array,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float | jax.Array = 0.01,
    subblock: int | None = None,
    chunks: int = 8,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (block-wise OBS) on one Flax kernel.

    Args:
      kernel: ``[in, out]`` weight (any float dtype; arithmetic is float32, the result keeps
        the input dtype).
      hessian: ``[in, in]`` calibration Hessian ``(2/n) X^T X``.
      sparsity: fraction of weights to prune (unstructured); traced, so one compilation serves
        every value. Ignored for N:M.
      prune_n, prune_m: N:M pruning (N pruned out of every M consecutive inputs, per output);
        ``0, 0`` = unstructured.
      blocksize: OBS block size (columns of torch's W = rows of the kernel).
      percdamp: damping as a fraction of the mean Hessian diagonal; multiplied by 10 (up to 8
        times) while the damped Hessian is not positive definite.
      subblock, chunks: speed knobs (results do not depend on them beyond float rounding).

    Returns:
      ``(pruned_kernel, mask)``; ``mask`` is boolean ``[in, out]``, True = kept.
    """
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be [in, out], got shape {kernel.shape}")
    n = kernel.shape[0]
    if hessian.shape != (n, n):
        raise ValueError(f"hessian must be [{n}, {n}], got {hessian.shape}")
    if (prune_n == 0) != (prune_m == 0) or prune_n < 0 or prune_n > prune_m:
        raise ValueError(f"bad N:M = {prune_n}:{prune_m}")
    if prune_m and (blocksize % prune_m or n % prune_m):
        raise ValueError(f"N:M needs M={prune_m} to divide blocksize and in ({blocksize}, {n})")
    if subblock is None:
        subblock = 32 if blocksize % 32 == 0 and 32 % max(prune_m, 1) == 0 else blocksize
    if blocksize % subblock or (prune_m and subblock % prune_m):
        raise ValueError(f"subblock {subblock} must divide blocksize and be a multiple of M")
    return _sparsegpt_jit(
        kernel,
        hessian,
        jnp.asarray(sparsity, _F32),
        jnp.asarray(percdamp, _F32),
        prune_n=int(prune_n),
        prune_m=int(prune_m),
        blocksize=int(blocksize),
        subblock=int(subblock),
        chunks=max(1, int(chunks)),
    )

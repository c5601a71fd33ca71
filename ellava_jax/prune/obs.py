"""Block-wise OBS pruning of one linear kernel (SparseGPT), in JAX.

The semantics are SparseGPT's (Frantar & Alistarh 2023, `fasterprune`) and llm-compressor's
`sparsify_weight`; see docs/architecture.md ("Pruning data flow").

Layout: a Flax kernel is ``[in, out]``, the transpose of torch's ``W[out, in]``. An OBS "column"
(one input feature) is therefore one contiguous *row* of the kernel, and all per-column work
below is a row operation on a ``[rows, out]`` slab.

Algorithm (torch notation W[out, n], H[n, n]):

* dead inputs (``H_jj == 0``) get ``H_jj = 1`` and ``W[:, j] = 0``; damping
  ``lambda = percdamp * mean(diag H)``;
* ``U`` is the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``). We never form ``H^-1``:
  with ``H = R R^T``, ``R`` upper triangular (a Cholesky factorisation of the index-reversed
  ``H``, done recursively: matmuls above LAPACK leaves of at most 512 rows), ``U = R^-1``.
  Only the ``blocksize`` x ``blocksize`` diagonal blocks of ``U`` are inverted explicitly.
  A damped ``H`` that is still not positive definite is retried with 10x the damping (up to 8
  times, inside jit); if all fail, ``R = I`` (magnitude scores, no updates; llm-compressor's
  fallback), never NaN;
* columns are processed in blocks of ``blocksize``. Inside a block the unstructured mask is
  chosen jointly over the block: the ``k`` smallest ``w^2 / U_jj^2`` with
  ``k = floor(sparsity * elements of the block) + 1`` as SparseGPT's ``tmp <= sorted[k]``
  (exactly that many: ties at the threshold, which SparseGPT all prunes, are broken by
  position; sparsity 0 prunes nothing). Matching that one extra weight per block matters: on
  ill-conditioned Hessians its error compensation moves enough later weights across the
  threshold to cost ~0.5% mask agreement; for N:M, the N smallest per output row in
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
* inside a block, a ``lax.fori_loop`` over tiles of ``tile`` rows: one small matmul brings the
  errors of the block's earlier tiles into the tile (left-looking again), then the tile's
  columns run unrolled; that column loop is elementwise across the ``out`` axis (the
  coefficients of U are scalars), so XLA fuses it into a few passes over ``[tile, out]``;
* the unstructured mask of a block (exactly the k smallest scores) comes from a bisection on
  the float32 bit patterns of the scores (counts only, no sort), ties broken by position;
* every product has a transposed triangular factor (``R^T``, ``U^T``) on its left. Those read
  transposes materialised once (`_transposed`): XLA:CPU runs a folded ``A^T @ B`` at about
  half the rate of ``A @ B``, and that alone took 4096x4096 at 50% from 2.55 s to 2.26 s.
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
_CHOL_BASE = 512  # the recursive factorisation hands blocks of at most this size to LAPACK
# Speed defaults, measured on 2 cores (XLA:CPU). Each chunk is one compiled scan (compile time
# grows with their number), so small kernels use few long chunks, and kernels of at least
# _BIG_KERNEL weights (LLaMA-7B's), where run time dominates, shorter ones (less wasted
# contraction). Tiles: 16 rows unstructured, 8 for N:M. XLA's fusion of the unrolled column
# loop is fragile: 32 blocks of [128, 4096] took 208 ms at tile 16 against 638 ms at 8 and
# 664 ms at 32 (unstructured, float mask), and 2:4 212 ms at 8 against 2x that at 16.
_BIG_KERNEL = 2**22
_SMALL = dict(chunks=6, min_chunk=8)
_BIG = dict(chunks=8, min_chunk=4)

_TRACES = {"sparsegpt": 0}


def trace_count() -> int:
    """How many times the jitted SparseGPT kernel has been traced (compiled) in this process."""
    return _TRACES["sparsegpt"]


# --------------------------------------------------------------------------------------------
# Factorisation


def _reverse_cholesky(h: jax.Array) -> jax.Array:
    """Upper-triangular ``r`` with ``h = r @ r.T`` (NaN where ``h`` is not positive definite)."""
    return jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]


def _split(n: int) -> int:
    """Where the recursive factorisation splits ``n`` rows: about half, on a multiple of 128."""
    s = (n // 2 + 64) // 128 * 128
    return s if 0 < s < n else n // 2


def _factor_tree(h: jax.Array, base: int):
    """Recursive upper factor ``h = r r^T`` as a tree: a leaf ``(r, r^-1)`` (LAPACK on at most
    ``base`` rows) or a node ``(s, top_left, r12, bottom_right)``. All the work above the leaves
    is matmuls: ``r22`` first, ``r12 = h12 r22^-T``, then ``r11`` from ``h11 - r12 r12^T``."""
    n = h.shape[0]
    if n <= base:
        r = _reverse_cholesky(h)
        return (r, solve_triangular(r, jnp.eye(n, dtype=r.dtype), lower=False))
    s = _split(n)
    t22 = _factor_tree(h[s:, s:], base)
    r12 = _solve_right(t22, h[:s, s:])
    t11 = _factor_tree(h[:s, :s] - r12 @ r12.T, base)
    return (s, t11, r12, t22)


def _solve_right(tree, b: jax.Array) -> jax.Array:
    """``x`` with ``x @ r.T = b`` for the factor ``r`` held by ``tree``."""
    if len(tree) == 2:
        return b @ tree[1].T
    s, t11, r12, t22 = tree
    x2 = _solve_right(t22, b[:, s:])
    x1 = _solve_right(t11, b[:, :s] - x2 @ r12.T)
    return jnp.concatenate([x1, x2], axis=1)


def _assemble(tree, out: jax.Array, at: int = 0) -> jax.Array:
    if len(tree) == 2:
        m = tree[0].shape[0]
        return out.at[at : at + m, at : at + m].set(tree[0])
    s, t11, r12, t22 = tree
    out = _assemble(t11, out, at)
    out = out.at[at : at + s, at + s : at + s + r12.shape[1]].set(r12)
    return _assemble(t22, out, at + s)


def _reverse_cholesky_blocked(h: jax.Array, base: int = 512) -> jax.Array:
    tree = _factor_tree(h, base)
    return _assemble(tree, jnp.zeros_like(h))


def _damped_factor(h: jax.Array, damp0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Factor ``h + damp I``, retrying with 10x the damping while it is not positive definite.

    Returns ``(r, ok)``; when every try failed ``r`` is the identity (no error propagation,
    scores become plain magnitudes: llm-compressor's fallback) and ``ok`` is False.
    """
    n = h.shape[0]
    idx = jnp.arange(n)

    def factor(damp):
        return _reverse_cholesky_blocked(h.at[idx, idx].add(damp), _CHOL_BASE)

    def cond(state):
        _, _, tries, ok = state
        return jnp.logical_and(~ok, tries < _MAX_DAMP_TRIES)

    def body(state):
        _, damp, tries, _ = state
        damp = jnp.where(tries == 0, damp, damp * 10.0)
        r = factor(damp)  # traced once: the first try runs inside the loop too
        return r, damp, tries + 1, jnp.all(jnp.isfinite(r))

    init = (jnp.zeros_like(h), damp0, jnp.int32(0), jnp.bool_(False))
    r, _, _, ok = lax.while_loop(cond, body, init)
    return jnp.where(ok, r, jnp.eye(n, dtype=r.dtype)), ok


# --------------------------------------------------------------------------------------------
# Masks (True = pruned inside this module; the public function returns True = kept)


def _count(mask: jax.Array) -> jax.Array:
    """Number of True entries of a 2-D mask, as float32 (exact below 2**24; a column-wise
    float sum first: XLA:CPU vectorises it far better than one integer reduction)."""
    return jnp.sum(jnp.sum(mask.astype(_F32), axis=0))


def _smallest_k(score: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask of exactly ``k`` smallest entries of a non-negative ``score`` (ties: first
    in row-major order). ``score`` may hold +inf for entries that must not be chosen."""
    bits = lax.bitcast_convert_type(score, jnp.int32)  # monotone for non-negative floats
    kf = k.astype(_F32)

    # smallest t with count(bits <= t) >= k, by bisection on the bit pattern
    def bisect(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = _count(bits <= mid) >= kf
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    t, _ = lax.fori_loop(0, 32, bisect, (jnp.int32(0), jnp.int32(_INF_BITS)))
    below = bits < t
    tied = bits == t
    need = kf - _count(below)  # how many of the tied entries to take
    n_tied = _count(tied)
    flat = lax.broadcasted_iota(jnp.int32, score.shape, 0) * score.shape[1] + (
        lax.broadcasted_iota(jnp.int32, score.shape, 1)
    )

    def first_tied(_):
        # smallest j with count(tied & flat < j) >= need
        def bisect_idx(_, lohi):
            lo, hi = lohi
            mid = lo + (hi - lo) // 2
            enough = _count(tied & (flat < mid)) >= need
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        nbits = max(1, math.ceil(math.log2(score.size + 1)) + 1)
        j, _ = lax.fori_loop(0, nbits, bisect_idx, (jnp.int32(0), jnp.int32(score.size)))
        return tied & (flat < j)

    take = lax.cond(need >= n_tied, lambda _: tied, first_tied, None)
    return below | take


def _smallest_n_of_group(scores: list[jax.Array], n: int) -> list[jax.Array]:
    """``scores``: M arrays ``[out]``; per output, mask of the ``n`` smallest of the M (ties:
    earlier first)."""
    masks = []
    for a, sa in enumerate(scores):
        rank = sum(
            ((sb <= sa) if b < a else (sb < sa)).astype(jnp.int32)
            for b, sb in enumerate(scores)
            if b != a
        )
        masks.append(rank < n)
    return masks


# --------------------------------------------------------------------------------------------
# One block


def _obs_base(w, u, inv_d, pruned, *, prune_n, prune_m):
    """Column-by-column OBS on a few rows, fully unrolled. Everything here is elementwise
    across the ``out`` axis (the coefficients of ``u`` are scalars), so XLA fuses it into a
    few loops over the output features. ``pruned`` (unstructured) is a float 0/1 mask: XLA:CPU
    fused the loop about 2.5x slower around a boolean ``where`` (32 blocks of [128, 4096] at
    tile 16: 578 against 208 ms). Returns ``(errors, pruned)``."""
    m = w.shape[0]
    rows = [w[i] for i in range(m)]
    masks = [None if pruned is None else pruned[i] for i in range(m)]
    errs = []
    for i in range(m):
        if prune_n and i % prune_m == 0:
            group = [jnp.square(rows[i + t] * inv_d[i + t]) for t in range(prune_m)]
            chosen = _smallest_n_of_group(group, prune_n)
            for t in range(prune_m):
                masks[i + t] = chosen[t]
        if prune_n:
            e = jnp.where(masks[i], rows[i], 0.0) * inv_d[i]
        else:
            e = rows[i] * (masks[i] * inv_d[i])
        errs.append(e)
        for j in range(i + 1, m):
            rows[j] = rows[j] - u[i, j] * e
    return jnp.stack(errs), jnp.stack(masks)


def _obs_tiles(w, u, ut, inv_d, pruned, *, prune_n, prune_m, tile):
    """OBS on ``w[B, out]`` with the block's inverse-Hessian factor ``u[B, B]`` (and its
    transpose ``ut``, materialised: see `_transposed`), ``tile`` rows at a time
    (``lax.fori_loop``): each tile first receives the errors of the earlier tiles of the block by
    one matmul (left-looking), then runs the unrolled column loop of `_obs_base`."""
    nrow, nout = w.shape
    ntile = nrow // tile

    fixed = None if prune_n else pruned.astype(_F32)  # unstructured: chosen for the block

    def step(t, carry):
        errs, masks = carry
        r0 = t * tile
        ut_rows = lax.dynamic_slice_in_dim(ut, r0, tile, 0)  # U[:, tile]^T
        wt = lax.dynamic_slice_in_dim(w, r0, tile, 0) - ut_rows @ errs  # later errs rows are 0
        utt = lax.dynamic_slice_in_dim(lax.dynamic_slice_in_dim(u, r0, tile, 1), r0, tile, 0)
        dt = lax.dynamic_slice_in_dim(inv_d, r0, tile, 0)
        pt = None if prune_n else lax.dynamic_slice_in_dim(fixed, r0, tile, 0)
        et, pt = _obs_base(wt, utt, dt, pt, prune_n=prune_n, prune_m=prune_m)
        errs = lax.dynamic_update_slice_in_dim(errs, et, r0, 0)
        if prune_n:
            masks = lax.dynamic_update_slice_in_dim(masks, pt, r0, 0)
        return errs, masks

    masks = jnp.zeros(w.shape, bool) if prune_n else pruned
    return lax.fori_loop(0, ntile, step, (jnp.zeros_like(w), masks))


def _prune_block(w, u, ut, valid, sparsity, *, prune_n, prune_m, tile):
    """OBS on one block. ``w[B, out]`` current values, ``u[B, B]`` the upper Cholesky factor of
    the block's inverse Hessian and ``ut`` its transpose, ``valid[B]`` False on padding rows.
    Returns ``(q, pruned)``."""
    nout = w.shape[1]
    d = jnp.diagonal(u)
    inv_d = 1.0 / d
    if prune_n == 0:
        score = jnp.square(w * inv_d[:, None])
        score = jnp.where(valid[:, None], score, jnp.inf)
        count = jnp.sum(valid, dtype=jnp.int32) * nout
        # SparseGPT's count: its threshold is sorted(score)[floor(s * count)] and it prunes
        # every score <= threshold, i.e. floor(s * count) + 1 (ties beyond that we break by
        # position). Sparsity 0 stays dense (SparseGPT would prune one weight per block).
        k = jnp.floor(count.astype(_F32) * sparsity).astype(jnp.int32)
        k = jnp.where(sparsity > 0, k + 1, 0)
        pruned = _smallest_k(score, jnp.clip(k, 0, count))
    else:
        pruned = None
    e, pruned = _obs_tiles(w, u, ut, inv_d, pruned, prune_n=prune_n, prune_m=prune_m, tile=tile)
    # q = w - (U^T e) restricted to kept entries; a pruned entry is exactly 0, a kept one is the
    # current value after all earlier columns of the block
    q = jnp.where(pruned, 0.0, w - jnp.tril(ut, -1) @ e)
    return q, pruned


# --------------------------------------------------------------------------------------------
# The jitted kernel


def _transposed(a: jax.Array) -> jax.Array:
    """The transpose of the last two axes, materialised. XLA folds a plain transpose into the
    dot that reads it, and XLA:CPU runs such a ``A^T @ B`` at about half the rate of ``A @ B``
    (measured on 2 cores: 1024x1024 by 1024x4096, 80 against 147 GFLOP/s)."""
    return lax.optimization_barrier(jnp.swapaxes(a, -1, -2))


@functools.partial(
    jax.jit, static_argnames=("prune_n", "prune_m", "blocksize", "tile", "chunks", "min_chunk")
)
def _sparsegpt_jit(
    kernel, hessian, sparsity, percdamp, *, prune_n, prune_m, blocksize, tile, chunks, min_chunk
):
    # Over 80 lines on purpose: one jitted kernel; the block loop reads as SparseGPT's algorithm.
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
    rdiag = jnp.stack([r[i * bsz : (i + 1) * bsz, i * bsz : (i + 1) * bsz] for i in range(nb)])
    eye = jnp.broadcast_to(jnp.eye(bsz, dtype=_F32), rdiag.shape)
    udiag = solve_triangular(rdiag, eye, lower=False)

    prune_block = functools.partial(
        _prune_block, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, tile=tile
    )

    # every product below has a transposed triangular factor on the left
    rt = _transposed(r)
    utdiag = _transposed(udiag)

    per_chunk = max(-(-nb // chunks), min_chunk)
    d_chunks = []  # (row0, row1, D rows) of finished chunks
    q_out, m_out = [], []
    for b0 in range(0, nb, per_chunk):
        b1 = min(nb, b0 + per_chunk)
        r0, r1 = b0 * bsz, b1 * bsz
        nbc, rows = b1 - b0, r1 - r0
        # changes of all earlier chunks, for every row of this chunk: C = R[prev, chunk]^T D_prev
        corr = jnp.zeros((rows, nout), _F32)
        for p0, p1, dp in d_chunks:
            corr = corr + rt[r0:r1, p0:p1] @ dp
        rtrows = rt[r0:r1, r0:r1].reshape(nbc, bsz, rows)  # block j: R[chunk, j]^T
        xs = (
            jnp.arange(nbc),
            w[r0:r1].reshape(nbc, bsz, nout),
            corr.reshape(nbc, bsz, nout),
            rtrows,
            udiag[b0:b1],
            utdiag[b0:b1],
            valid[b0:b1],
        )

        def step(dchunk, x):
            j, wb, cb, rtb, ub, utb, vb = x
            cb = cb + rtb @ dchunk  # changes of the earlier blocks of this chunk
            wcur = wb + utb @ cb
            q, pruned = prune_block(wcur, ub, utb, vb)
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
    tile: int | None = None,
    chunks: int | None = None,
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
      tile, chunks: speed knobs (results do not depend on them beyond float rounding): rows
        per unrolled column loop, and how many compiled scans the blocks are grouped in.
        ``None`` picks them by mode and kernel size (see ``_SMALL`` / ``_BIG``).

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
    speed = _BIG if kernel.size >= _BIG_KERNEL else _SMALL
    if tile is None:  # the preferred size, halved until it divides the block
        tile = 8 if prune_m else 16
        while blocksize % tile and tile > max(1, prune_m):
            tile //= 2
    chunks = speed["chunks"] if chunks is None else chunks
    if prune_m and tile % prune_m:
        tile = prune_m * max(1, tile // prune_m)
    if blocksize % tile:
        raise ValueError(f"tile {tile} must divide blocksize {blocksize}")
    return _sparsegpt_jit(
        kernel,
        hessian,
        jnp.asarray(sparsity, _F32),
        jnp.asarray(percdamp, _F32),
        prune_n=int(prune_n),
        prune_m=int(prune_m),
        blocksize=int(blocksize),
        tile=int(tile),
        chunks=max(1, int(chunks)),
        min_chunk=speed["min_chunk"],
    )

"""SparseGPT (ellava_jax.prune.obs) against llm-compressor's `sparsify_weight`, plus its own
invariants: exact sparsity, bf16, dead inputs, indefinite Hessians, one compilation for every
sparsity, and lower reconstruction error than magnitude and Wanda on correlated inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ellava_jax.prune import obs
from ellava_jax.prune.baselines import magnitude_prune, wanda_prune
from ellava_jax.prune.obs import sparsegpt

N_IN, N_OUT, N_TOK = 320, 256, 1024  # 320 = 2.5 blocks of 128: exercises the partial block
DEAD = (5, 200)
OUTLIERS = (17, 131, 300)


def _problem(seed=0, n_in=N_IN, n_out=N_OUT, n_tok=N_TOK, dead=DEAD, outliers=OUTLIERS):
    """Torch-layout weight W[out, in] and correlated calibration inputs X[tokens, in]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    mix = np.eye(n_in) + 0.5 * rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
    lowrank = rng.standard_normal((n_tok, 8)) @ rng.standard_normal((8, n_in))
    x = (rng.standard_normal((n_tok, n_in)) @ mix + 0.7 * lowrank).astype(np.float32)
    x[:, list(outliers)] *= 25.0
    x[:, list(dead)] = 0.0
    return w, x


def _hessian(x, chunk=128):
    """H = (2/n) X^T X as a running mean over samples of `chunk` tokens (llm-compressor's
    convention), in numpy."""
    h = np.zeros((x.shape[1], x.shape[1]), np.float64)
    n = 0
    for c in range(0, x.shape[0], chunk):
        xc = x[c : c + chunk].astype(np.float64)
        h *= n / (n + 1)
        n += 1
        h += (2.0 / n) * xc.T @ xc
    return h.astype(np.float32)


def _recon(x, w, w_hat):
    return float(np.linalg.norm(x @ w.T - x @ np.asarray(w_hat, np.float32).T))


def _ours(w, h, sparsity=0.5, **kw):
    q, mask = sparsegpt(jnp.asarray(w.T), jnp.asarray(h), sparsity, **kw)
    return np.asarray(q, np.float32).T, np.asarray(mask).T  # back to torch layout


# --------------------------------------------------------------------------------------------
# parity with llm-compressor


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch")
    pytest.importorskip("llmcompressor")
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import (
        accumulate_hessian,
        sparsify_weight,
    )

    w, x = _problem()
    torch.manual_seed(0)
    with torch.no_grad():
        lin = torch.nn.Linear(N_IN, N_OUT, bias=False)
        lin.weight.copy_(torch.from_numpy(w))
        h = torch.zeros((N_IN, N_IN), dtype=torch.float32)
        nsamp = 0
        for c in range(0, N_TOK, 128):  # one calibration sample = 128 tokens
            h, nsamp = accumulate_hessian(torch.from_numpy(x[c : c + 128])[None], lin, h, nsamp)

    def run(sparsity, prune_n, prune_m):
        with torch.no_grad():
            _, w_ref = sparsify_weight(
                lin, {lin: h.clone()}, sparsity, prune_n, prune_m, 128, 0.01, False
            )
        return w_ref.detach().numpy().astype(np.float32)

    return w, x, h.numpy().copy(), run


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
def test_parity_llmcompressor(reference, nm):
    w, x, h, run = reference
    np.testing.assert_allclose(h, _hessian(x), rtol=2e-4, atol=2e-3)  # same H convention
    w_ref = run(0.5, *nm)
    q, mask = _ours(w, h, 0.5, prune_n=nm[0], prune_m=nm[1])
    mask_ref = w_ref != 0
    agree = np.mean(mask == mask_ref)
    assert agree >= 0.999, agree
    e_ours, e_ref = _recon(x, w, q), _recon(x, w, w_ref)
    assert abs(e_ours - e_ref) <= 0.005 * e_ref, (e_ours, e_ref)
    # dead inputs are zeroed by both
    assert np.all(q[:, list(DEAD)] == 0) and np.all(w_ref[:, list(DEAD)] == 0)


# --------------------------------------------------------------------------------------------
# invariants


@pytest.fixture(scope="module")
def problem():
    w, x = _problem(seed=1)
    return w, x, _hessian(x)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_unstructured_sparsity(problem, sparsity):
    w, _, h = problem
    q0, mask0 = _ours(w, h, 0.0)  # sparsity 0: dense, unchanged
    assert bool(mask0.all())
    w_live = w.copy()
    w_live[:, list(DEAD)] = 0.0
    np.testing.assert_allclose(q0, w_live, rtol=0, atol=1e-6)
    q, mask = _ours(w, h, sparsity)
    blocks = [(0, 128), (128, 256), (256, N_IN)]
    for b0, b1 in blocks:  # exact count per block, SparseGPT's floor(sparsity * elements) + 1
        pruned = int((~mask[:, b0:b1]).sum())
        assert pruned == int(np.floor(np.float32(sparsity) * N_OUT * (b1 - b0))) + 1, (b0, pruned)
    assert np.all(q[~mask] == 0)
    assert np.all(np.isfinite(q))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
def test_exact_n_of_m(problem, nm):
    w, _, h = problem
    n, m = nm
    q, mask = _ours(w, h, prune_n=n, prune_m=m)
    kept_per_group = mask.reshape(N_OUT, N_IN // m, m).sum(-1)
    assert np.all(kept_per_group == m - n)
    assert np.all(q[~mask] == 0)


def test_bf16_kernel(problem):
    w, x, h = problem
    kernel = jnp.asarray(w.T, jnp.bfloat16)
    q, mask = sparsegpt(kernel, jnp.asarray(h), 0.5)
    assert q.dtype == jnp.bfloat16 and mask.dtype == jnp.bool_
    # same as the float32 computation on the bf16-rounded weights, rounded at the end
    q32, mask32 = sparsegpt(kernel.astype(jnp.float32), jnp.asarray(h), 0.5)
    assert np.mean(np.asarray(mask) == np.asarray(mask32)) > 0.999
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q32.astype(jnp.bfloat16)))
    assert float(jnp.mean(~mask)) == pytest.approx(0.5, abs=1e-3)


def test_dead_inputs(problem):
    w, x, h = problem
    assert np.all(np.diag(h)[list(DEAD)] == 0)
    q, mask = _ours(w, h, 0.5)
    assert np.all(q[:, list(DEAD)] == 0)
    assert np.all(np.isfinite(q))
    # a fully dead Hessian: nothing to propagate, still the exact sparsity
    q0, mask0 = _ours(w, np.zeros_like(h), 0.5)
    assert np.all(q0 == 0) and np.all(np.isfinite(q0))


def test_indefinite_hessian_no_nan(problem):
    w, _, h = problem
    rng = np.random.default_rng(3)
    a = rng.standard_normal((N_IN, N_IN)).astype(np.float32)
    h_bad = ((a + a.T) / 2).astype(np.float32)  # strongly indefinite
    np.fill_diagonal(h_bad, np.abs(np.diag(h_bad)) + 0.1)
    assert np.linalg.eigvalsh(h_bad).min() < -1.0
    for nm in [(0, 0), (2, 4)]:
        q, mask = _ours(w, h_bad, 0.5, prune_n=nm[0], prune_m=nm[1])
        assert np.all(np.isfinite(q))
        assert float(np.mean(~mask)) == pytest.approx(0.5, abs=1e-3)
    # barely not positive definite (rank deficient minus a little): fixed by more damping
    x = rng.standard_normal((64, N_IN)).astype(np.float32)
    h_sing = (x.T @ x - 1e-3 * np.eye(N_IN)).astype(np.float32)
    q, mask = _ours(w, h_sing, 0.5, percdamp=0.0)
    assert np.all(np.isfinite(q)) and float(np.mean(~mask)) == pytest.approx(0.5, abs=1e-3)


def test_one_compilation_for_every_sparsity(problem):
    w, _, h = problem
    kernel, hess = jnp.asarray(w.T[:, :128]), jnp.asarray(h)  # a shape no other test uses
    before = obs.trace_count()
    cache_before = obs._sparsegpt_jit._cache_size()
    for sparsity in (0.2, 0.5, 0.6, 0.9):
        q, mask = sparsegpt(kernel, hess, sparsity)
        assert float(jnp.mean(~mask)) == pytest.approx(sparsity, abs=2e-3)
    assert obs.trace_count() - before == 1
    assert obs._sparsegpt_jit._cache_size() - cache_before == 1


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
def test_beats_magnitude_and_wanda(problem, nm):
    w, x, h = problem
    n, m = nm
    q, _ = _ours(w, h, 0.5, prune_n=n, prune_m=m)
    kernel = jnp.asarray(w.T)
    norms = jnp.asarray(np.linalg.norm(x, axis=0))
    q_mag, mask_mag = magnitude_prune(kernel, 0.5, prune_n=n, prune_m=m)
    q_wanda, mask_wanda = wanda_prune(kernel, norms, 0.5, prune_n=n, prune_m=m)
    for mk in (mask_mag, mask_wanda):
        assert float(jnp.mean(~mk)) == pytest.approx(0.5, abs=1e-3)
    e_sgpt = _recon(x, w, q)
    e_mag = _recon(x, w, np.asarray(q_mag).T)
    e_wanda = _recon(x, w, np.asarray(q_wanda).T)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)


def test_baseline_masks():
    k = jnp.asarray(np.arange(24, dtype=np.float32).reshape(6, 4) - 11.5)
    q, mask = magnitude_prune(k, 0.5)
    assert int(mask.sum()) == 12 and np.all(np.abs(np.asarray(k))[np.asarray(mask)] > 5)
    norms = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 100.0])
    q, mask = wanda_prune(k, norms, 0.5)
    assert np.all(np.asarray(mask.sum(0)) == 3) and bool(jnp.all(mask[5]))
    q, mask = wanda_prune(k, norms, prune_n=1, prune_m=2)
    assert np.all(np.asarray(mask.reshape(3, 2, 4).sum(1)) == 1)


def test_bad_arguments():
    k, h = jnp.zeros((64, 8)), jnp.eye(64)
    with pytest.raises(ValueError):
        sparsegpt(k, jnp.eye(32), 0.5)
    with pytest.raises(ValueError):
        sparsegpt(k, h, 0.5, prune_n=3, prune_m=0)
    with pytest.raises(ValueError):
        sparsegpt(jnp.zeros((66, 8)), jnp.eye(66), 0.5, prune_n=2, prune_m=4)


def test_jit_and_traced_sparsity():
    """The public function composes with an outer jit (sparsity traced from outside)."""
    k = jnp.asarray(np.random.default_rng(0).standard_normal((128, 16)), jnp.float32)
    h = jnp.eye(128)
    f = jax.jit(lambda s: sparsegpt(k, h, s)[1].sum())
    assert int(f(0.25)) == 128 * 16 - 513  # SparseGPT's floor(s * count) + 1


def test_chunks_and_tiles_do_not_change_the_result():
    """Speed knobs: several chunks (left-looking across chunks) and another tile size give the
    single-chunk result up to float rounding."""
    w, x = _problem(seed=2, n_in=640, n_out=48, n_tok=1024, dead=(7,), outliers=(100,))
    h = jnp.asarray(_hessian(x))
    kernel = jnp.asarray(w.T)
    q1, m1 = sparsegpt(kernel, h, 0.5, blocksize=64, chunks=1)
    # 10 blocks of 64 -> chunks of 8 and 2 blocks
    q2, m2 = sparsegpt(kernel, h, 0.5, blocksize=64, chunks=2, tile=4)
    assert np.mean(np.asarray(m1) == np.asarray(m2)) > 0.999
    e1, e2 = _recon(x, w, np.asarray(q1).T), _recon(x, w, np.asarray(q2).T)
    assert abs(e1 - e2) <= 1e-3 * e1


def test_big_kernel_speed_defaults_give_the_same_result(monkeypatch):
    """Kernels past ``_BIG_KERNEL`` weights use short chunks (8 blocks of 64 here, in chunks of
    2): same result as the small-kernel defaults up to float rounding."""
    w, x = _problem(seed=3, n_in=512, n_out=64, n_tok=1024, dead=(5,), outliers=(70,))
    h = jnp.asarray(_hessian(x))
    kernel = jnp.asarray(w.T)
    for nm in [(0, 0), (2, 4)]:
        q1, m1 = sparsegpt(kernel, h, 0.5, prune_n=nm[0], prune_m=nm[1], blocksize=64)
        monkeypatch.setattr(obs, "_BIG_KERNEL", 1)
        monkeypatch.setattr(obs, "_BIG", dict(chunks=4, min_chunk=2))
        q2, m2 = sparsegpt(kernel, h, 0.5, prune_n=nm[0], prune_m=nm[1], blocksize=64)
        monkeypatch.undo()
        assert np.mean(np.asarray(m1) == np.asarray(m2)) > 0.999
        assert float(jnp.mean(~m2)) == pytest.approx(0.5, abs=1.0 / m2.size * 8)
        e1, e2 = _recon(x, w, np.asarray(q1).T), _recon(x, w, np.asarray(q2).T)
        assert abs(e1 - e2) <= 1e-3 * e1


def test_default_tile_fits_any_blocksize():
    """The default tile shrinks to divide an odd block size; the result is the usual one."""
    w, x = _problem(seed=4, n_in=120, n_out=16, n_tok=400, dead=(), outliers=())
    h = jnp.asarray(_hessian(x))
    q1, m1 = sparsegpt(jnp.asarray(w.T), h, 0.5, blocksize=40)  # tile 16 -> 8
    q2, m2 = sparsegpt(jnp.asarray(w.T), h, 0.5, blocksize=40, tile=4)
    assert np.mean(np.asarray(m1) == np.asarray(m2)) > 0.999
    np.testing.assert_allclose(np.asarray(q1), np.asarray(q2), atol=1e-4)


def test_blocked_reverse_cholesky():
    """The recursive (matmul) factorisation: h = r r^T, r upper, as LAPACK's on the reversed h."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((900, 700)).astype(np.float32)
    h = jnp.asarray(x.T @ x / 900 + 0.01 * np.eye(700, dtype=np.float32))
    factor = jax.jit(lambda h: obs._reverse_cholesky_blocked(h, 128))
    r = factor(h)
    assert bool(jnp.all(jnp.tril(r, -1) == 0))
    np.testing.assert_allclose(np.asarray(r @ r.T), np.asarray(h), atol=2e-5)
    np.testing.assert_allclose(np.asarray(r), np.asarray(obs._reverse_cholesky(h)), atol=2e-5)
    bad = h.at[3, 3].set(-1.0)  # not positive definite: NaN somewhere, as LAPACK
    assert not bool(jnp.all(jnp.isfinite(factor(bad))))

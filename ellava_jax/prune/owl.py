"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): per-layer sparsities from each
decoder layer's share of outlier Wanda scores.

For decoder layer l, with S = |W_ij| * ||X_j||_2 over the seven linears of the layer together
(X_j: input feature j of that linear, on the dense model's calibration tokens):

  D_l  = 100 * #{S > M * mean(S)} / #S                   outlier ratio, percent
  D'_l = (D_l - min D) / (max D - min D) * 2 * lambda    rescaled to [0, 2 lambda]
  s_l  = p0 - (D'_l - mean D')                           sparsity of every matrix of layer l

so layers with more outliers are pruned less, the layers' mean sparsity is p0 (and, every
layer having the same size, so is the parameter-weighted mean) and max s - min s = 2 lambda
(every s_l lies in p0 +- 2 lambda (1 - 1/L); not necessarily in p0 +- lambda). When every
layer has the same ratio, every layer gets p0. These are luuyin/OWL's `lib/prune_all.py`
and llm-compressor's `_infer_owl_layer_sparsity` (`sparsity_profile="owl"`, `owl_m`,
`owl_lmbda`); the outlier ratio is computed as they do, in float32 with a float32 threshold.

The input norms come from one dense calibration pass (`hessian.calibrate(mode="dense")`):
sqrt(diag H) is proportional to ||X_j||_2 with one factor for the whole layer (every group of
a layer sees the same samples), and OWL's ratio is unchanged by a common factor. A caller may
hand its own norms instead (`input_norms`), e.g. llm-compressor's per-batch accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import UserError
from ellava_jax.model import llama
from ellava_jax.prune.hessian import MATRIX_GROUP, CalibrationSet, calibrate
from ellava_jax.prune.masks import MATRICES, get_path, kernel_path

__all__ = [
    "hessian_input_norms",
    "layer_outlier_ratio",
    "owl_from_ratios",
    "owl_layer_sparsities",
    "owl_outlier_ratios",
]

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def hessian_input_norms(hessians: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{group: sqrt(diag H)}: each input feature's L2 norm over the calibration tokens, up to
    one factor per layer (H = (2/n) X^T X)."""
    return {
        g: jnp.sqrt(jnp.maximum(jnp.diag(h).astype(jnp.float32), 0.0)) for g, h in hessians.items()
    }


@jax.jit
def _column_sums(kernel, norms):
    """Sums over inputs of |W| * ||X|| for each output column, float32 ([out])."""
    return jnp.sum(jnp.abs(kernel.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None], 0)


@jax.jit
def _count_above(kernel, norms, threshold):
    score = jnp.abs(kernel.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None]
    return jnp.sum(score > threshold, dtype=jnp.int32)


def layer_outlier_ratio(
    layer_params: Mapping, input_norms: Mapping[str, jax.Array], m: float = DEFAULT_M
) -> float:
    """Percentage of the layer's Wanda scores |W_ij| * ||X_j|| above m times their mean, over
    its seven linears together.

    Args:
      layer_params: one decoder layer's parameters (`{self_attn, mlp}/<name>/kernel`, [in, out]).
      input_norms: {group: [in]} per input group of `hessian.GROUPS` (attn_in, o_in, mlp_in,
        down_in); any positive factor common to the whole layer leaves the ratio unchanged.
    """
    kernels = []
    total, count = 0.0, 0
    for name in MATRICES:
        kernel = get_path(layer_params, kernel_path(0, name)[3:])
        norms = jnp.asarray(input_norms[MATRIX_GROUP[name]])
        if norms.shape != (kernel.shape[0],):
            raise ValueError(
                f"{name}: input norms of shape {norms.shape}, expected ({kernel.shape[0]},)"
            )
        kernels.append((kernel, norms))
        total += float(np.sum(np.asarray(_column_sums(kernel, norms), np.float64)))
        count += kernel.size
    # the mean and threshold in float32, as a float32 torch tensor's mean times M would be
    threshold = np.float32(np.float32(total / count) * np.float32(m))
    above = sum(int(_count_above(k, n, threshold)) for k, n in kernels)
    return 100.0 * above / count


def owl_from_ratios(ratios: Sequence[float], p0: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios (module docstring): a layer's
    sparsity is p0 minus its rescaled ratio's distance above the mean. Every sparsity must
    land in [0, 1); otherwise a UserError names the layer."""
    if lam < 0:
        raise UserError(f"OWL's lambda is {lam}; expected a number >= 0 (default {DEFAULT_LAMBDA})")
    r = np.asarray(ratios, np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"outlier ratios: expected one per layer, got shape {r.shape}")
    span = float(r.max() - r.min())
    if span == 0.0 or lam == 0.0:
        out = np.full(r.shape, float(p0))
    else:
        scaled = (r - r.min()) * (2.0 * lam / span)  # in [0, 2 lambda]
        out = float(p0) - (scaled - scaled.mean())
    for i, s in enumerate(out):
        if not 0.0 <= s < 1.0:
            raise UserError(
                f"OWL gives layer {i} the sparsity {s:.4f} (p0 {p0}, lambda {lam}), outside "
                "[0, 1); choose a smaller --owl-lambda or another --sparsity"
            )
    return [float(s) for s in out]


def owl_outlier_ratios(
    config: LlavaConfig,
    params: dict,
    calib: CalibrationSet | None,
    m: float = DEFAULT_M,
    *,
    input_norms: Sequence[Mapping[str, jax.Array]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[float]:
    """Each decoder layer's outlier ratio (percent, `layer_outlier_ratio`).

    Args:
      calib: calibration set; one dense calibration pass gives each layer's norms
        sqrt(diag H). Not needed (may be None) when `input_norms` is given.
      input_norms: one {group: [in]} per layer, used instead of the calibration pass.
    """
    if m <= 0:
        raise UserError(f"OWL's M is {m}; expected a positive number (default {DEFAULT_M:g})")
    n = config.text.num_hidden_layers
    if input_norms is not None:
        if len(input_norms) != n:
            raise ValueError(f"input_norms: {len(input_norms)} layers, the model has {n}")
        return [
            layer_outlier_ratio(llama.layer_params(params, i), input_norms[i], m) for i in range(n)
        ]
    if calib is None:
        raise UserError("OWL needs calibration data (proxy samples) for its input norms")
    ratios: list[float] = []

    def on_layer(i, lp, hessians):
        ratios.append(layer_outlier_ratio(lp, hessian_input_norms(hessians), m))

    calibrate(
        config, params, calib, on_layer, mode="dense", batch_size=batch_size, progress=progress
    )
    return ratios


def owl_layer_sparsities(
    config: LlavaConfig,
    params: dict,
    calib: CalibrationSet | None,
    p0: float,
    m: float = DEFAULT_M,
    lam: float = DEFAULT_LAMBDA,
    *,
    input_norms: Sequence[Mapping[str, jax.Array]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[float]:
    """OWL's sparsity for each decoder layer (one number per layer, for all seven matrices),
    from the dense model's input norms on `calib` (or `input_norms`; see `owl_outlier_ratios`)."""
    ratios = owl_outlier_ratios(
        config,
        params,
        calib,
        m,
        input_norms=input_norms,
        batch_size=batch_size,
        progress=progress,
    )
    return owl_from_ratios(ratios, p0, lam)

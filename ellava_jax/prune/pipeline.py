"""Pruning a whole model: calibration pass + one pruner per decoder linear.

`prune_model` is what `ellava prune` and the search's final re-prune call: SparseGPT and Wanda
share the sequential calibration pass of `hessian.calibrate`; magnitude pruning needs none.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import UserError
from ellava_jax.mesh import place, to_device
from ellava_jax.model.llama import unstack_layers, with_layers
from ellava_jax.prune import baselines
from ellava_jax.prune.hessian import MATRIX_GROUP, CalibrationSet, calibrate
from ellava_jax.prune.masks import (
    decoder_linears,
    get_path,
    kernel_path,
    set_path,
)
from ellava_jax.prune.obs import sparsegpt

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass
class PruneStats:
    """What a pruning run did: how many pruner calls, and how long it took."""

    method: str
    pruner_calls: int = 0
    seconds: float = 0.0
    per_matrix_seconds: dict = field(default_factory=dict)


def parse_nm(spec: str | None) -> tuple[int, int]:
    """'2:4' -> (2, 4); None -> (0, 0) (unstructured)."""
    if not spec:
        return 0, 0
    try:
        n, m = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"--nm {spec!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise UserError(f"--nm {spec!r}: need 0 < N < M")
    return n, m


def _prune_matrix(method: str, kernel, hessian, sparsity: float, nm: tuple[int, int]):
    n, m = nm
    if method == "sparsegpt":
        return sparsegpt(kernel, hessian, sparsity, prune_n=n, prune_m=m)

    if method == "wanda":
        norms = jnp.sqrt(jnp.maximum(jnp.diag(hessian), 0.0))  # proportional to ||X_j||_2
        return baselines.wanda_prune(kernel, norms, sparsity, prune_n=n, prune_m=m)
    if method == "magnitude":
        return baselines.magnitude_prune(kernel, sparsity, prune_n=n, prune_m=m)
    raise UserError(f"pruning method {method!r}: choose one of {METHODS}")


def _on_one_device(method: str, kernel, hessian, sparsity: float, nm: tuple[int, int]):
    """`_prune_matrix`; a kernel split over a mesh is pruned whole on one of its devices (the
    pruners' column loops would exchange data at every step) and split again after."""
    sharding = getattr(kernel, "sharding", None)
    if sharding is None or len(sharding.device_set) == 1:
        return _prune_matrix(method, kernel, hessian, sparsity, nm)
    me = jax.process_index()  # one of this process's devices (several hosts: each prunes)
    one = min((d for d in sharding.device_set if d.process_index == me), key=lambda d: d.id)
    kernel, hessian = to_device(kernel, one), to_device(hessian, one)
    new, info = _prune_matrix(method, kernel, hessian, sparsity, nm)
    return place(new, sharding), info


def prune_layer(
    method: str,
    layer: int,
    layer_params: dict,
    hessians: Mapping | None,
    sparsities: Mapping[tuple[int, str], float],
    nm: tuple[int, int],
    stats: PruneStats,
) -> dict:
    """One decoder layer's seven matrices pruned; returns the new layer params."""
    out = layer_params
    for (li, m), s in sparsities.items():
        if li != layer or (s <= 0 and nm == (0, 0)):
            continue
        path = kernel_path(li, m)[3:]  # inside the layer
        w = get_path(layer_params, path)
        h = None if hessians is None else hessians[MATRIX_GROUP[m]]
        t0 = time.perf_counter()
        new_w, _ = _on_one_device(method, w, h, s, nm)
        new_w.block_until_ready()
        stats.per_matrix_seconds[f"{li}.{m}"] = time.perf_counter() - t0
        stats.pruner_calls += 1
        out = set_path(out, path, new_w)
    return out


def prune_model(
    config: LlavaConfig,
    params: dict,
    sparsities: Mapping[tuple[int, str], float],
    method: str = "sparsegpt",
    calib: CalibrationSet | None = None,
    *,
    nm: tuple[int, int] = (0, 0),
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict, PruneStats]:
    """Prunes every decoder linear to its sparsity.

    Args:
      sparsities: {(layer, matrix): sparsity}, e.g. from `masks.policy_to_sparsities`.
      method: "sparsegpt" | "wanda" | "magnitude".
      calib: calibration set (needed by sparsegpt and wanda; sequential, as SparseGPT).
      nm: (N, M) for N:M sparsity, (0, 0) for unstructured.

    Returns:
      (pruned params, stats).
    """
    if method not in METHODS:
        raise UserError(f"pruning method {method!r}: choose one of {METHODS}")
    stats = PruneStats(method)
    t0 = time.perf_counter()
    if method == "magnitude":
        layers = [
            prune_layer(method, i, lp, None, sparsities, nm, stats)
            for i, lp in enumerate(unstack_layers(params))
        ]
        params = with_layers(params, layers)
    else:
        if calib is None:
            raise UserError(f"method {method!r} needs calibration data (proxy samples)")

        def on_layer(i, lp, hess):
            return prune_layer(method, i, lp, hess, sparsities, nm, stats)

        params = calibrate(
            config,
            params,
            calib,
            on_layer,
            mode="sequential",
            batch_size=batch_size,
            progress=progress,
        )
    stats.seconds = time.perf_counter() - t0
    assert {k for k in sparsities} <= set(decoder_linears(config))
    return params, stats

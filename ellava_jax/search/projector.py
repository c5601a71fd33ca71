"""Search-space evolution: train the projector W_p on the c_m-weighted loss of the top candidates.

The projector only sees image tokens, so this step uses the multimodal proxy samples. Their CLIP
features are computed once (the tower is frozen); each step projects them with the current W_p,
merges them into the text embeddings and runs every top candidate's pruned decoder (the same
vmapped population pass as the fitness). Only `multi_modal_projector` parameters change.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ellava_jax.config import LlavaConfig
from ellava_jax.search.fitness import (
    ProxyBatch,
    layer_entries,
    population_sums_jit,
    project_and_merge,
)


@struct.dataclass
class MultimodalProxy:
    """Multimodal proxy samples with their (fixed) CLIP features."""

    input_ids: jax.Array  # [N, T] with image placeholders
    attention_mask: jax.Array  # [N, T]
    text_embeds: jax.Array  # [N, T, H] token embeddings (placeholders not yet replaced)
    vision_feats: jax.Array  # [B_img, n_img_tokens, D_v]
    labels: jax.Array
    label_mask: jax.Array
    dense_logp: jax.Array | None = None  # KL target: the dense model's log-probs

    def batch(self, config: LlavaConfig, projector_params) -> ProxyBatch:
        embeds = project_and_merge(
            config, projector_params, self.vision_feats, self.input_ids, self.text_embeds
        )
        return ProxyBatch(
            embeds, self.attention_mask, self.labels, self.label_mask, self.dense_logp
        )


def importance_weights(levels_idx, neighbors: int = 5, mode: str = "neighbors") -> np.ndarray:
    """c_m for the top candidates (paper eq. 7).

    c_m = softmax_m(-sum over the `neighbors` nearest other candidates a of ||alpha_m - a||^2),
    with alpha in grid steps (see docs/architecture.md); mode "uniform" gives 1/M ("Evo w/o UB").
    """
    x = np.asarray(levels_idx, np.float64)
    m = x.shape[0]
    if mode == "uniform" or m == 1:
        return np.full(m, 1.0 / m)
    if mode != "neighbors":
        raise ValueError(f"importance weighting {mode!r}: expected 'neighbors' or 'uniform'")
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    k = min(neighbors, m - 1)
    s = np.sort(d, axis=1)[:, :k].sum(1)
    z = -(s - s.min())
    return np.exp(z) / np.exp(z).sum()


def _weighted_loss(proj, config, params, stacks, lv_layers, weights, mm: list[MultimodalProxy]):
    """sum_m c_m L_m, L_m the candidate's mean loss over every bucket's scored positions."""
    dtype = params["language_model"]["embed_tokens"]["embedding"].dtype
    sums, count = 0.0, 0.0
    for bucket in mm:
        b = bucket.batch(config, proj)
        sums = sums + population_sums_jit(
            config,
            params,
            stacks,
            lv_layers,
            b.inputs_embeds.astype(dtype),
            b.attention_mask,
            b.labels,
            b.label_mask,
            b.dense_logp,
            remat=True,  # the backward pass keeps each layer's input, not its activations
        )
        count = count + jnp.sum(b.label_mask)
    losses = sums / jnp.maximum(count, 1.0)
    return jnp.sum(weights * losses), losses


@partial(jax.jit, static_argnums=(1, 2))
def _train(proj, config, steps, lr, params, stacks, lv_layers, weights, mm):
    opt = optax.adam(lr)
    state = opt.init(proj)
    grad_fn = jax.value_and_grad(_weighted_loss, has_aux=True)

    def step(carry, _):
        proj, state = carry
        (loss, _), g = grad_fn(proj, config, params, stacks, lv_layers, weights, mm)
        upd, state = opt.update(g, state, proj)
        return (optax.apply_updates(proj, upd), state), loss

    (proj, _), losses = jax.lax.scan(step, (proj, state), None, length=steps)
    return proj, losses


def merge_duplicates(idx, weights) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of `idx` [M, E] (first-seen order) and the summed weight of each."""
    idx = np.asarray(idx)
    uniq, first, inverse = np.unique(idx, axis=0, return_index=True, return_inverse=True)
    summed = np.bincount(inverse.reshape(-1), weights=np.asarray(weights, np.float64))
    order = np.argsort(first, kind="stable")
    return uniq[order], summed[order]


def significant(weights, mass: float = 0.999) -> np.ndarray:
    """Indices of the heaviest candidates that together hold at least `mass` of the weight,
    rounded up to a power of two (so the training step compiles for at most log2(M) + 1
    population sizes); heaviest first. mass >= 1 keeps every candidate."""
    w = np.asarray(weights, np.float64)
    order = np.argsort(-w, kind="stable")
    if mass >= 1.0:
        return order
    n = int(np.searchsorted(np.cumsum(w[order]), mass * w.sum())) + 1
    return order[: min(1 << (n - 1).bit_length(), len(w))]


def train_projector(
    config: LlavaConfig,
    params: dict,
    db,
    space,
    top_idx,
    weights,
    mm: MultimodalProxy | list[MultimodalProxy],
    *,
    steps: int,
    lr: float,
    mass: float = 0.999,
) -> tuple[dict, np.ndarray]:
    """Adam on sum_m c_m L_m(W_p) over the top candidates; returns (new projector, loss per step).

    The top candidates often repeat a policy (the population converges, and a small grid has
    few valid policies): each distinct policy is run once with the sum of its weights, which
    is exact. c_m (eq. 7) is a softmax of negative squared distances and often puts nearly all
    its weight on two or three candidates: only those holding `mass` of it are run
    (`significant`), their weights renormalised; the objective changes by at most 1 - mass of
    its weight.
    """
    proj = params["multi_modal_projector"]
    if steps <= 0:
        return proj, np.zeros(0)
    mm = [mm] if isinstance(mm, MultimodalProxy) else list(mm)
    top_idx, weights = merge_duplicates(top_idx, weights)
    keep = significant(weights, mass)
    top_idx, weights = top_idx[keep], weights[keep]
    weights = weights / weights.sum()
    lv_layers = jnp.asarray(top_idx[:, layer_entries(space)])
    stacks = db.device_stacks()
    w = jnp.asarray(weights, jnp.float32)
    new, losses = _train(proj, config, int(steps), float(lr), params, stacks, lv_layers, w, mm)
    return new, np.asarray(losses)

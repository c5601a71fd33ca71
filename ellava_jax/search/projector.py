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
from ellava_jax.mesh import HostShards, from_host, to_host
from ellava_jax.model.llama import take_layer
from ellava_jax.search.fitness import (
    ProxyBatch,
    _head_loss_sums,
    _layer_population,
    _layer_step_donating,
    _layer_step_jit,
    _shared_stack,
    layer_entries,
    population_sums_jit,
    project_and_merge,
    row_chunks,
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


def _weighted_loss(
    proj, config, params, stacks, lv_layers, weights, mm: list[MultimodalProxy], chunks
):
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
            chunks=chunks,
        )
        count = count + jnp.sum(b.label_mask)
    losses = sums / jnp.maximum(count, 1.0)
    return jnp.sum(weights * losses), losses


def _loss_step(proj, state, config, lr, params, stacks, lv_layers, weights, mm, chunks):
    """One Adam step on `_weighted_loss`: (projector, Adam state, loss before the step)."""
    grad_fn = jax.value_and_grad(_weighted_loss, has_aux=True)
    (loss, _), g = grad_fn(proj, config, params, stacks, lv_layers, weights, mm, chunks)
    upd, state = optax.adam(lr).update(g, state, proj)
    return optax.apply_updates(proj, upd), state, loss


@partial(jax.jit, static_argnums=(1, 2), static_argnames="chunks")
def _train(proj, config, steps, lr, params, stacks, lv_layers, weights, mm, chunks=(None, None)):
    """Every step in one program: the whole decoder scanned, each layer recomputed in the
    backward pass (`chunks`: candidates x rows per block of a layer)."""

    def step(carry, _):
        p, state, loss = _loss_step(
            *carry, config, lr, params, stacks, lv_layers, weights, mm, chunks
        )
        return (p, state), loss

    state = optax.adam(lr).init(proj)
    (proj, _), losses = jax.lax.scan(step, (proj, state), None, length=steps)
    return proj, losses


# one step as its own program: minibatches change the samples every step
_train_step = partial(jax.jit, static_argnums=2, static_argnames="chunks")(_loss_step)


def _of_step(mm, t: int) -> list:
    """Step t's buckets: `mm` itself, or its t-th entry when it holds one list per step."""
    return mm[t] if mm and isinstance(mm[0], list) else mm


# ---------------------------------------------------------------------------------------------
# Streamed: one decoder layer on the device at a time, the backward pass layer by layer.


@partial(jax.jit, static_argnums=0, static_argnames="chunks")
def _layer_vjp(cfg, shared, stacks, lv, h, mask, g, chunks=(None, None)):
    """The cotangent of a layer's input from its output's (the layer recomputed, block by
    block: see fitness._layer_population)."""
    _, pull = jax.vjp(lambda x: _layer_population(cfg, shared, stacks, lv, x, mask, chunks), h)
    return pull(g)[0]


@partial(jax.jit, static_argnums=0)
def _head_grad(config, params, h, labels, label_mask, dense_logp, w):
    """(loss sums [P], d sum_m w_m sums_m / dh) for final hidden states h [P, n, T, H]."""

    def f(x):
        s = _head_loss_sums(config, params, x, labels, label_mask, dense_logp, remat=True)
        return jnp.sum(w * s), s

    (_, sums), g = jax.value_and_grad(f, has_aux=True)(h)
    return sums, g


@partial(jax.jit, static_argnums=(0, 1))
def _embed_vjp(config, dtype, proj, bucket: MultimodalProxy, g):
    """The projector's gradient from the cotangent of the bucket's merged embeddings."""
    _, pull = jax.vjp(lambda p: bucket.batch(config, p).inputs_embeds.astype(dtype), proj)
    return pull(g.astype(dtype))[0]


@partial(jax.jit, static_argnums=(0, 1))
def _embeds(config, dtype, proj, bucket: MultimodalProxy):
    return bucket.batch(config, proj).inputs_embeds.astype(dtype)


@jax.jit
def _adam_step(proj, state, grads, lr):
    upd, state = optax.adam(lr).update(grads, state, proj)
    return optax.apply_updates(proj, upd), state


def _back_on_device(x):
    """A kept layer input: as it is, or (offloaded) copied back with the sharding it had."""
    return from_host(x) if isinstance(x, HostShards) else x


def _bucket_grad(config, params, db, lv_layers, w, bucket, proj, how) -> tuple:
    """(loss sums [P], projector gradient) of one bucket, streamed: the forward runs layer by
    layer keeping each layer's input (on the host with `how["offload"]`), the head takes the
    KL targets one row chunk at a time, and the backward runs layer by layer (`_layer_vjp`).
    Each layer's kernels cross to the device twice per step (forward and backward)."""
    cfg, chunks = config.text, how["chunks"]
    dtype = params["language_model"]["embed_tokens"]["embedding"].dtype
    feats = bucket.replace(dense_logp=None)  # the KL targets stay where they are (host)
    embeds = _embeds(config, dtype, proj, feats)
    mask = bucket.attention_mask
    shared = _shared_stack(params)
    h = jnp.broadcast_to(embeds, (lv_layers.shape[0], *embeds.shape))
    inputs = []
    # offloaded, each input is copied to the host and its device buffer handed to the output
    step = _layer_step_donating if how["offload"] else _layer_step_jit
    for layer in range(cfg.num_hidden_layers):
        inputs.append(HostShards.of(h) if how["offload"] else h)
        h = step(
            cfg,
            take_layer(shared, layer),
            db.layer_kernels(layer),
            lv_layers[:, layer],
            h,
            mask,
            chunks=chunks,
        )
    part = ProxyBatch(embeds, mask, bucket.labels, bucket.label_mask, bucket.dense_logp)
    sums, g = 0.0, jnp.zeros_like(h)
    for rows, own, chunk in row_chunks(part, chunks[1]):
        s, gc = _head_grad(
            config, params, h[:, rows], chunk.labels, chunk.label_mask, chunk.dense_logp, w
        )
        g = g.at[:, own].set(gc[:, : len(own)])
        sums = sums + s
    del h
    for layer in reversed(range(cfg.num_hidden_layers)):
        g = _layer_vjp(
            cfg,
            take_layer(shared, layer),
            db.layer_kernels(layer),
            lv_layers[:, layer],
            _back_on_device(inputs.pop()),
            mask,
            g,
            chunks=chunks,
        )
    g_embeds = jnp.sum(g.astype(jnp.float32), axis=0)
    return sums, _embed_vjp(config, dtype, proj, feats, g_embeds)


def _streamed_gradient(config, params, db, lv_layers, weights, mm, proj, chunks, offload):
    """(sum_m c_m L_m, its gradient in the projector), accumulated over the buckets, each
    bucket's decoder passes streamed (`_bucket_grad`)."""
    count = float(sum(float(jnp.sum(b.label_mask)) for b in mm))
    w = weights / max(count, 1.0)  # d J / d sums_m
    how = {"chunks": chunks, "offload": offload}
    sums, grads = 0.0, jax.tree.map(jnp.zeros_like, proj)
    for bucket in mm:
        s, g = _bucket_grad(config, params, db, lv_layers, w, bucket, proj, how)
        sums, grads = sums + s, jax.tree.map(jnp.add, grads, g)
    return float(jnp.sum(w * sums)), grads


def _train_streamed(proj, config, steps, lr, params, db, lv_layers, weights, mm, chunks, offload):
    """`_train`, streamed: Adam on the gradient of `_streamed_gradient`. `mm`: the buckets of
    every step, or a list of each step's own (minibatches). Returns (projector, loss per
    step)."""
    state = optax.adam(lr).init(proj)
    losses = []
    for t in range(steps):
        loss, grads = _streamed_gradient(
            config, params, db, lv_layers, weights, _of_step(mm, t), proj, chunks, offload
        )
        losses.append(loss)
        proj, state = _adam_step(proj, state, grads, jnp.float32(lr))
    return proj, np.asarray(losses, np.float32)


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
    streaming: bool = False,
    row_chunk: int | None = None,
    candidate_chunk: int | None = None,
    offload: bool = False,
    step_batches: list | None = None,
) -> tuple[dict, np.ndarray]:
    """Adam on sum_m c_m L_m(W_p) over the top candidates; returns (new projector, loss per step).

    `step_batches`: each step's own buckets (minibatches of the multimodal samples,
    `FitnessBatches.training_samples`), one step per entry; `mm` and `steps` are then unused.

    The top candidates often repeat a policy (the population converges, and a small grid has
    few valid policies): each distinct policy is run once with the sum of its weights, which
    is exact. c_m (eq. 7) is a softmax of negative squared distances and often puts nearly all
    its weight on two or three candidates: only those holding `mass` of it are run
    (`significant`), their weights renormalised; the objective changes by at most 1 - mass of
    its weight.

    Unstreamed, every step runs in one program over the whole decoder (the level stacks on
    the device). `streaming`: the gradient is accumulated over the buckets with one layer on
    the device at a time, forward and backward (`_bucket_grad`); `row_chunk` x
    `candidate_chunk` bound each layer's block (both ways); `offload` keeps the layers'
    inputs for the backward pass on the host (streaming only).
    """
    proj = params["multi_modal_projector"]
    if step_batches is not None:
        mm, steps = list(step_batches), len(step_batches)
    if steps <= 0:
        return proj, np.zeros(0)
    mm = [mm] if isinstance(mm, MultimodalProxy) else list(mm)
    top_idx, weights = merge_duplicates(top_idx, weights)
    keep = significant(weights, mass)
    top_idx, weights = top_idx[keep], weights[keep]
    weights = weights / weights.sum()
    lv_layers = jnp.asarray(top_idx[:, layer_entries(space)])
    w = jnp.asarray(weights, jnp.float32)
    chunks = (candidate_chunk, row_chunk)
    if streaming:
        return _train_streamed(
            proj, config, int(steps), lr, params, db, lv_layers, w, mm, chunks, offload
        )
    if offload:
        raise ValueError("offload keeps the streamed backward pass's layer inputs: streaming only")
    stacks = db.device_stacks()
    if step_batches is None:
        new, losses = _train(
            proj, config, int(steps), float(lr), params, stacks, lv_layers, w, mm, chunks=chunks
        )
        return new, to_host(losses)
    state, losses = optax.adam(lr).init(proj), []
    for batch in mm:
        proj, state, loss = _train_step(
            proj, state, config, jnp.float32(lr), params, stacks, lv_layers, w, batch, chunks=chunks
        )
        losses.append(loss)
    return proj, np.asarray([float(x) for x in losses], np.float32)

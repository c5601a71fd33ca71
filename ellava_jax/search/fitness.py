"""Fitness of a whole population of pruning policies in one jitted, vmapped call.

J(alpha) = L_proxy(alpha) + eta * G(alpha), minimised, where
  L_proxy  the language-model loss (or KL to the dense model) on the proxy batch: text segments
           and multimodal samples, with the candidate's kernels looked up in the level database;
  G        sum over pruned matrices of log(||W_i * M_i(alpha)||_F / ||W_i||_F), read from the
           database's norm table (the log of the paper's product of Frobenius norms, scale-free).

The population runs through the decoder together, as one scanned layer (`jax.lax.scan` over the
database's [L, K, in, out] stacks: one layer in the program whatever the depth): at each layer,
each candidate's kernels are gathered from the stacks ([K, in, out] -> [P, in, out]) and the
layer is vmapped over candidates. `streaming=True` runs one jitted layer step at a time (the
same program for every layer), so only one layer's stacks are on the device at once (the
database may live on the host); the default scans the whole decoder in one program. Either way
a layer may run in blocks of candidates x rows (`candidate_chunk`, `row_chunk`), one block's
activations alive at a time (`_layer_population`).

The proxy samples come as parts (`ProxyBatch` each), every part padded only to its own longest
row; L_proxy is the token-weighted mean over all parts. A part marked `fixed` (the text
segments: no image tokens, so the projector never reaches them) has a loss that only depends
on the policy: `fitness` scores it once per distinct policy and keeps the sum in `cache`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ellava_jax.config import LlavaConfig
from ellava_jax.mesh import over_data, population_state, to_host
from ellava_jax.model.llama import (
    LlamaDecoderLayer,
    RMSNorm,
    attention_mask_4d,
    positions_from_mask,
    rope_cos_sin,
    take_layer,
    with_layers,
)
from ellava_jax.model.llava import decode, lm_head, merge_image_features, project
from ellava_jax.model.losses import token_loss_sum
from ellava_jax.prune.database import LevelDatabase
from ellava_jax.prune.masks import MATRICES, decoder_linears, kernel_path, set_path
from ellava_jax.search.policy import PolicySpace


@struct.dataclass
class ProxyBatch:
    """Decoder inputs and next-token targets of the proxy samples (left-padded)."""

    inputs_embeds: jax.Array  # [N, T, H]
    attention_mask: jax.Array  # [N, T]
    labels: jax.Array  # [N, T] the next token at each position
    label_mask: jax.Array  # [N, T] float, 1 where the next token is a real text token
    dense_logp: jax.Array | None = None  # [N, T, V] the dense model's log-probs: KL loss
    # True when the loss cannot depend on the projector (no image tokens): cacheable per policy
    fixed: bool = struct.field(pytree_node=False, default=False)


def as_parts(batch) -> list[ProxyBatch]:
    """A ProxyBatch or a sequence of them -> a list of parts."""
    return [batch] if isinstance(batch, ProxyBatch) else list(batch)


def token_count(parts) -> float:
    """Scored positions in all parts (the denominator of L_proxy)."""
    return float(sum(float(jnp.sum(p.label_mask)) for p in as_parts(parts)))


def layer_entries(space: PolicySpace) -> np.ndarray:
    """[L, 7] entry index of each (layer, matrix)."""
    n = space.config.text.num_hidden_layers
    return np.array([[space.entry_of(layer, m) for m in MATRICES] for layer in range(n)], np.int32)


def generalization_term(
    space: PolicySpace, db: LevelDatabase, idx, reading: str = "sum"
) -> jax.Array:
    """G per candidate: the sum (the paper's log of a product of norm ratios) or the mean over
    matrices of log norm ratios of the candidate's kernels. idx [P, E] -> [P].

    The sum grows with depth (210 matrices in a 30-layer LLaMA, 28 in the 4-layer toy), so at a
    fixed eta it outweighs L_proxy in a deep model; the mean does not."""
    order = list(decoder_linears(space.config))
    table = jnp.asarray(db.log_norm_table(order), jnp.float32)  # [n_mat, K]
    ent = jnp.asarray([space.entry_of(layer, m) for layer, m in order])
    lv = jnp.asarray(idx)[:, ent]  # [P, n_mat]
    per_matrix = jnp.take_along_axis(table[None], lv[..., None], axis=2)[..., 0]
    if reading not in ("sum", "mean"):
        raise ValueError(f"G reading {reading!r}: expected 'sum' or 'mean'")
    return per_matrix.sum(-1) if reading == "sum" else per_matrix.mean(-1)


def _shared_stack(params: dict) -> dict:
    """The decoder's stacked layer params without the seven kernels (norm scales, [L, H])."""
    stack = params["language_model"]["layers"]
    return {k: v for k, v in stack.items() if k in ("input_layernorm", "post_attention_layernorm")}


def _with_kernels(shared: dict, kernels: dict) -> dict:
    """One layer's params: its norm scales and the given kernels {matrix: [in, out]}."""
    lp = dict(shared)
    for m, k in kernels.items():
        lp = set_path(lp, kernel_path(0, m)[3:], k)
    return lp


def _pad_index(n: int, size: int) -> np.ndarray:
    """0 .. n-1, then 0 again up to a multiple of `size`: a padded chunk repeats the first row
    (a real one, so no padded row is all-masked and nothing turns NaN)."""
    m = -(-n // size) * size
    i = np.arange(m)
    return np.where(i < n, i, 0)


def _layer_block(cfg, shared, stacks, lv, h, mask):
    """One decoder layer for candidates lv [p, 7] on rows h [p, n, T, H] with mask [n, T];
    stacks {m: [K, in, out]} (each candidate's kernels gathered: [p, in, out])."""
    positions = positions_from_mask(mask)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
    m4 = attention_mask_4d(mask, h.shape[2])
    kern = {m: stacks[m][lv[:, j]] for j, m in enumerate(MATRICES)}

    def one(k, hp):
        lp = _with_kernels(shared, k)
        return LlamaDecoderLayer(cfg).apply({"params": lp}, hp, cos, sin, m4)[0]

    return over_data(jax.vmap(one)(kern, over_data(h)))  # candidates side by side on a mesh


def _layer_population(cfg, shared, stacks, lv, h, mask, chunks=(None, None)):
    """One decoder layer for every candidate: lv [P, 7], h [P, N, T, H] -> [P, N, T, H].

    chunks = (candidates, rows) per pass (None: all): the layer runs on one block of that many
    candidates x rows at a time (`lax.map`), each block recomputed in a backward pass
    (`jax.checkpoint`), so its activations and attention scores exist for one block only. A
    last, short block is padded by repeating the first candidate / row; the padding is cut.
    On a mesh, h comes and goes split as `mesh.population_state`."""
    h = population_state(h)
    n_p, n_r = h.shape[:2]
    pc = n_p if chunks[0] is None else min(chunks[0], n_p)
    rc = n_r if chunks[1] is None else min(chunks[1], n_r)
    if pc == n_p and rc == n_r:
        return population_state(_layer_block(cfg, shared, stacks, lv, h, mask))
    ci, ri = _pad_index(n_p, pc), _pad_index(n_r, rc)
    tail = h.shape[2:]
    if len(ci) > n_p:  # padded (a gather copies; a reshape does not)
        lv, h = lv[ci], h[ci]
    if len(ri) > n_r:
        h, mask = h[:, ri], mask[ri]
    lvc = lv.reshape(len(ci) // pc, pc, lv.shape[1])
    hc = h.reshape(len(ci) // pc, pc, len(ri) // rc, rc, *tail)
    mc = mask.reshape(len(ri) // rc, rc, mask.shape[1])
    block = jax.checkpoint(partial(_layer_block, cfg, shared, stacks))

    def candidates(a):
        lv_c, h_c = a  # [pc, 7], [pc, nr, rc, T, H]
        out = jax.lax.map(lambda b: block(lv_c, b[0], b[1]), (jnp.swapaxes(h_c, 0, 1), mc))
        return jnp.swapaxes(out, 0, 1)  # [pc, nr, rc, T, H]

    out = jax.lax.map(candidates, (lvc, hc))
    return population_state(out.reshape(len(ci), len(ri), *tail)[:n_p, :n_r])


def _scan_population(cfg, params, stacks, lv_layers, h, mask, remat=False, chunks=(None, None)):
    """Every decoder layer for every candidate, as one scanned layer: stacks {m: [L, K, in,
    out]}, lv_layers [P, L, 7], h [P, N, T, H] -> [P, N, T, H]. `remat`: a backward pass
    recomputes each layer from its input (`jax.checkpoint`), so only the layers' inputs are
    kept for it, not their activations and attention scores."""

    def body(hp, xs):
        shared, layer_stacks, lv = xs
        return _layer_population(cfg, shared, layer_stacks, lv, hp, mask, chunks), None

    if remat:
        body = jax.checkpoint(body)

    xs = (_shared_stack(params), stacks, jnp.swapaxes(lv_layers, 0, 1))
    return jax.lax.scan(body, h, xs)[0]


def _head_loss_sums(config, params, h, labels, label_mask, dense_logp, remat=False, row_chunk=None):
    """Per-candidate loss sum from final hidden [P, N, T, H] (lax.map over candidates, and over
    chunks of `row_chunk` rows: one block's logits alive at a time; `remat`: nor does a
    backward pass keep them, it recomputes them)."""
    norm = RMSNorm(config.text.rms_norm_eps)
    norm_p = {"params": params["language_model"]["norm"]}

    def rows_sum(hp, lab, lmask, logp):
        logits = lm_head(config, params, norm.apply(norm_p, hp))
        return token_loss_sum(logits, lab, lmask, logp)[0]

    f = jax.checkpoint(rows_sum) if remat else rows_sum
    n = h.shape[1]
    rc = n if row_chunk is None else min(row_chunk, n)
    if rc == n:
        return jax.lax.map(lambda hp: f(hp, labels, label_mask, dense_logp), h)
    ri = _pad_index(n, rc)
    nr = len(ri) // rc

    def split(x):
        return None if x is None else x[ri].reshape(nr, rc, *x.shape[1:])

    real = jnp.asarray(np.arange(len(ri)) < n, label_mask.dtype)[:, None]
    lab, logp = split(labels), split(dense_logp)
    lmask = (label_mask[ri] * real).reshape(nr, rc, -1)

    def one(hp):
        return jax.lax.map(lambda a: f(*a), (split(hp), lab, lmask, logp)).sum()

    return jax.lax.map(one, h)


@partial(jax.jit, static_argnums=0, static_argnames=("remat", "chunks"))
def population_sums_jit(
    config,
    params,
    stacks,
    lv_layers,
    embeds,
    mask,
    labels,
    label_mask,
    dense_logp,
    remat=False,
    chunks=(None, None),
):
    """[P] loss sums of one part for the candidates' levels lv_layers [P, L, 7] (`remat`: for
    a backward pass, layers recomputed from their inputs; `chunks`: (candidates, rows) per
    block of a layer, rows per block of the head)."""
    p = lv_layers.shape[0]
    h = jnp.broadcast_to(embeds, (p, *embeds.shape))
    h = _scan_population(config.text, params, stacks, lv_layers, h, mask, remat, chunks)
    return _head_loss_sums(config, params, h, labels, label_mask, dense_logp, remat, chunks[1])


def _layer_step(cfg, shared, stacks, lv, h, mask, chunks=(None, None)):
    """One layer of the streamed population pass: the same program for every layer."""
    return _layer_population(cfg, shared, stacks, lv, h, mask, chunks)


_layer_step_jit = jax.jit(_layer_step, static_argnums=0, static_argnames="chunks")
# the same, handing the hidden state's buffer over to the output (its caller keeps no copy):
# one [P, N, T, H] less on the device
_layer_step_donating = jax.jit(
    _layer_step, static_argnums=0, static_argnames="chunks", donate_argnames="h"
)


_head_loss_sums_jit = jax.jit(_head_loss_sums, static_argnums=0, static_argnames="remat")


def population_loss_sums(
    config: LlavaConfig,
    params: dict,
    db: LevelDatabase,
    space: PolicySpace,
    idx,
    batch: ProxyBatch,
    *,
    streaming: bool = False,
    row_chunk: int | None = None,
    candidate_chunk: int | None = None,
) -> jax.Array:
    """Loss summed over one part's scored positions, per candidate: idx [P, E] -> [P].

    `row_chunk` / `candidate_chunk`: each layer runs on blocks of that many rows x candidates
    (and the head on that many rows), so activations and attention scores exist for one block
    at a time; the sums add up (the same loss up to float summation order). Streamed, each
    layer's kernels cross to the device once per part whatever the chunks, and the head takes
    its rows' KL targets one chunk at a time (they may stay on the host)."""
    ent = layer_entries(space)
    lv_layers = jnp.asarray(np.asarray(idx)[:, ent])  # [P, L, 7]
    embeds = batch.inputs_embeds.astype(params["language_model"]["embed_tokens"]["embedding"].dtype)
    chunks = (candidate_chunk, row_chunk)
    if not streaming:
        return population_sums_jit(
            config,
            params,
            db.device_stacks(),
            lv_layers,
            embeds,
            batch.attention_mask,
            batch.labels,
            batch.label_mask,
            batch.dense_logp,
            chunks=chunks,
        )
    h = jnp.broadcast_to(embeds, (lv_layers.shape[0], *embeds.shape))
    shared_stack = _shared_stack(params)
    for layer in range(config.text.num_hidden_layers):
        h = _layer_step_donating(
            config.text,
            take_layer(shared_stack, layer),
            db.layer_kernels(layer),
            lv_layers[:, layer],
            h,
            batch.attention_mask,
            chunks=chunks,
        )
    total = 0.0
    for rows, _, part in row_chunks(batch, row_chunk):
        total = total + _head_loss_sums_jit(
            config, params, h[:, rows], part.labels, part.label_mask, part.dense_logp
        )
    return total


def row_chunks(batch: ProxyBatch, size: int | None):
    """(rows, own, part) per chunk of `size` rows (None: the whole part): the chunk's row
    indices (padded, see `row_slice`), its own rows without the padding, and the chunk."""
    n = batch.inputs_embeds.shape[0]
    if size is None or size >= n:
        yield np.arange(n), np.arange(n), batch
        return
    for start in range(0, n, size):
        rows = row_index(n, start, size)
        yield rows, rows[: min(size, n - start)], row_slice(batch, start, size)


def row_index(n: int, start: int, size: int) -> np.ndarray:
    """Rows start : start + size of n, past the end the chunk's first row again."""
    want = np.arange(start, start + size)
    return np.where(want < n, want, start)


def row_slice(batch: ProxyBatch, start: int, size: int) -> ProxyBatch:
    """Rows start : start + size of a part; past its end, its first row again, unscored (label
    mask 0), so every chunk has `size` rows and one compiled program serves them all. A host
    (numpy) KL target stays on the host: only the chunk's rows are copied when it is read."""
    n = batch.inputs_embeds.shape[0]
    rows = row_index(n, start, size)
    real = jnp.asarray(np.arange(start, start + size) < n, jnp.float32)[:, None]

    def take(x):
        if x is None:
            return None
        return x[rows] if isinstance(x, np.ndarray) else x[jnp.asarray(rows)]

    return batch.replace(
        inputs_embeds=take(batch.inputs_embeds),
        attention_mask=take(batch.attention_mask),
        labels=take(batch.labels),
        label_mask=take(batch.label_mask) * real,
        dense_logp=take(batch.dense_logp),
    )


def population_losses(
    config: LlavaConfig,
    params: dict,
    db: LevelDatabase,
    space: PolicySpace,
    idx,
    parts,
    *,
    streaming: bool = False,
) -> jax.Array:
    """L_proxy of each candidate: idx [P, E] level indices -> [P] mean loss per scored token
    over all parts (a ProxyBatch or a list of them)."""
    parts = as_parts(parts)
    total = sum(
        population_loss_sums(config, params, db, space, idx, b, streaming=streaming) for b in parts
    )
    return total / max(token_count(parts), 1.0)


def _padded_sums(config, params, db, space, rows, batch, size, **how) -> np.ndarray:
    """population_loss_sums of `rows`, the batch padded (first row repeated) to `size` rows;
    `how`: streaming, row_chunk, candidate_chunk."""
    padded = np.concatenate([rows, np.repeat(rows[:1], size - len(rows), 0)])
    out = population_loss_sums(config, params, db, space, padded, batch, **how)
    return to_host(out).astype(np.float64)[: len(rows)]


def fitness(
    config: LlavaConfig,
    params: dict,
    db: LevelDatabase,
    space: PolicySpace,
    idx,
    parts,
    eta: float,
    *,
    cache: dict | None = None,
    streaming: bool = False,
    row_chunk: int | None = None,
    candidate_chunk: int | None = None,
    g_reading: str = "sum",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(J, L_proxy, G) per candidate; J = L_proxy + eta * G, lower is better (G read as
    `g_reading`: see `generalization_term`).

    A policy that appears several times in `idx` (a converging population repeats policies) is
    run once: the distinct policies are scored in a batch padded to a power of two, so the
    population pass compiles for a handful of sizes. With `cache` (a dict kept across calls
    on the same parts), a `fixed` part is scored only for policies it has not seen.
    """
    idx = np.asarray(idx)
    uniq, inverse = np.unique(idx, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    parts = as_parts(parts)

    def size(n):
        return min(1 << (n - 1).bit_length(), len(idx))

    how = dict(streaming=streaming, row_chunk=row_chunk, candidate_chunk=candidate_chunk)
    sums = np.zeros(len(uniq), np.float64)
    for i, part in enumerate(parts):
        if not (part.fixed and cache is not None):
            sums += _padded_sums(config, params, db, space, uniq, part, size(len(uniq)), **how)
            continue
        keys = [(i, part.inputs_embeds.shape, row.tobytes()) for row in uniq]
        todo = [r for r, k in enumerate(keys) if k not in cache]
        if todo:
            new = _padded_sums(config, params, db, space, uniq[todo], part, size(len(todo)), **how)
            cache.update({keys[r]: v for r, v in zip(todo, new)})
        sums += np.array([cache[k] for k in keys])
    loss = jnp.asarray(sums / max(token_count(parts), 1.0), jnp.float32)[jnp.asarray(inverse)]
    g = generalization_term(space, db, idx, g_reading)
    return loss + eta * g, loss, g


# ---------------------------------------------------------------------------------------------
# The reference it must equal: one candidate at a time through the ordinary model.


def assemble(
    config: LlavaConfig, params: dict, db: LevelDatabase, space: PolicySpace, idx_one
) -> dict:
    """Full params of one candidate, kernels looked up in the database."""
    idx_one = np.asarray(idx_one)
    stack = dict(params["language_model"]["layers"])
    for m in MATRICES:
        rows = [
            db.kernel(layer, m, int(idx_one[space.entry_of(layer, m)]))
            for layer in range(config.text.num_hidden_layers)
        ]
        stack = set_path(stack, kernel_path(0, m)[3:], jnp.stack([jnp.asarray(r) for r in rows]))
    return with_layers(params, stack)


@partial(jax.jit, static_argnums=0)
def single_loss_sum(config, params, batch: ProxyBatch):
    """Loss sum of one model on one part, through `decode` (the loop baseline)."""

    logits, _ = decode(config, params, batch.inputs_embeds, batch.attention_mask)
    return token_loss_sum(logits, batch.labels, batch.label_mask, batch.dense_logp)[0]


def loop_losses(config, params, db, space, idx, parts) -> np.ndarray:
    """The same L_proxy as `population_losses`, one candidate at a time (Python loop)."""
    parts = as_parts(parts)
    count = max(token_count(parts), 1.0)
    out = []
    for row in np.asarray(idx):
        p = assemble(config, params, db, space, row)
        out.append(sum(single_loss_sum(config, p, b) for b in parts) / count)
    return np.asarray(jnp.stack(out))


def dense_log_probs(config: LlavaConfig, params: dict, batch: ProxyBatch) -> jax.Array:
    """log-probabilities of the dense model on the batch (the KL target)."""

    logits, _ = jax.jit(decode, static_argnums=0)(
        config, params, batch.inputs_embeds, batch.attention_mask
    )
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def project_and_merge(config: LlavaConfig, projector_params, vision_feats, input_ids, text_embeds):
    """Multimodal embeddings for a given projector: CLIP features [B_img, N, D_v] are fixed."""
    feats = project(config, {"multi_modal_projector": projector_params}, vision_feats)
    return merge_image_features(config, input_ids, text_embeds, feats)

"""A prefill that drops visual tokens layer by layer (FitPrune), then greedy decoding on the reduced cache.

Layer l runs its attention on the tokens that entered it, ranks each image's visual tokens by
the attention they receive there (by default from the prompt's text tokens, max over heads),
keeps the top `keep[l]` per image, and runs o_proj and the MLP on the survivors only. The
hidden states, the original position ids (RoPE keeps them), the padding mask, the visual-token
flags and the image ids are gathered together, so every later layer sees a shorter, still
left-padded, still causal sequence. Layer l's KV cache holds the tokens that entered layer l;
decoding then attends to each layer's own reduced cache.

Shapes stay static: the recipe's counts are Python ints, and the width of the batch after each
layer (the longest row) is computed eagerly from `input_ids` and `attention_mask`
(`layer_widths`); a row with fewer images than the longest is left-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import UserError
from ellava_jax.model.generate import append_new_tokens, greedy_decode
from ellava_jax.model.llama import (
    LlamaDecoderLayer,
    LlamaMLP,
    RMSNorm,
    apply_rope,
    attend,
    attention_mask_4d,
    layer_params,
    positions_from_mask,
    rope_cos_sin,
)
from ellava_jax.model.llava import check_image_tokens, embed_inputs, embed_text, lm_head
from ellava_jax.tokens.recipe import SCORES, Recipe


def _keep_tuple(config: LlavaConfig, recipe) -> tuple[int, ...]:
    """Per-layer kept visual tokens per image, from a Recipe (checked) or a sequence of ints."""
    if isinstance(recipe, Recipe):
        recipe.check(config)
        keep = recipe.keep
    else:
        keep = tuple(int(k) for k in recipe)
    n, n_layers = config.num_image_tokens, config.text.num_hidden_layers
    if len(keep) != n_layers:
        raise UserError(f"recipe has {len(keep)} layers, the model {n_layers}")
    prev = n
    for i, k in enumerate(keep):
        if not 1 <= k <= prev:
            raise UserError(
                f"recipe keeps {k} visual tokens at layer {i}: must be within [1, {prev}] "
                f"(non-increasing, at most num_image_tokens={n})"
            )
        prev = k
    return tuple(keep)


def _score_kind(recipe, score: str | None) -> str:
    if score is None:
        score = getattr(recipe, "score", "text")
    if score not in SCORES:
        raise UserError(f"unknown token score {score!r}; choose one of {SCORES}")
    return score


def image_layout(config: LlavaConfig, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """(images per row, text tokens per row) of concrete inputs; checks whole images per row."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) > 0
    is_img = (ids == config.image_token_index) & mask
    n_img_tok = is_img.sum(axis=1)
    n = config.num_image_tokens
    if np.any(n_img_tok % n):
        raise UserError(
            f"rows hold {n_img_tok.tolist()} image placeholder tokens: each row must hold whole "
            f"images of num_image_tokens={n}"
        )
    return n_img_tok // n, (mask & ~is_img).sum(axis=1)


def layer_widths(
    config: LlavaConfig, keep: Sequence[int], input_ids, attention_mask, pad_to: int = 1
) -> tuple[int, ...]:
    """Static width of the batch after each layer: the longest row once it has dropped its tokens.

    A layer that drops nothing keeps the width it was given (so a keep-all recipe runs on
    exactly the arrays the normal forward uses). `pad_to` rounds widths up to a multiple, so
    that batches of slightly different lengths share one compilation.
    """
    images, text = image_layout(config, input_ids, attention_mask)
    width, prev, out = np.asarray(input_ids).shape[1], config.num_image_tokens, []
    for k in keep:
        if k < prev:
            longest = int(np.max(text + images * k))
            width = min(width, -(-longest // pad_to) * pad_to)
        out.append(width)
        prev = k
    return tuple(out)


def _check_last_token(config: LlavaConfig, input_ids, keep) -> None:
    if min(keep, default=config.num_image_tokens) < config.num_image_tokens:
        last = np.asarray(input_ids)[:, -1]
        if np.any(last == config.image_token_index):
            raise UserError(
                "a prompt ends with an image token: FitPrune may drop it, so the prompt must end "
                "with text (as LLaVA prompts do, e.g. 'ASSISTANT:')"
            )


# ---------------------------------------------------------------------------------------------
# One decoder layer that drops tokens after its attention


def attention(cfg, p, x, cos, sin, mask, cache=None):
    """The decoder's self-attention up to (not including) o_proj, as `LlamaAttention` computes it.

    Returns (attention output before o_proj [B, T, heads*hd], probs [B, kv, group, T, S], cache).
    """
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ p["q_proj"]["kernel"]).reshape(b, t, nh, hd)
    k = (x @ p["k_proj"]["kernel"]).reshape(b, t, nkv, hd)
    v = (x @ p["v_proj"]["kernel"]).reshape(b, t, nkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), 0, 1)
        v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), 0, 1)
        cache = {"k": k, "v": v}
    probs, out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    return out, probs, cache


def visual_scores(probs, valid, vis, img, kind: str = "text"):
    """Attention each token receives, max over heads: from text queries ('text'), or that
    times the mean from the visual queries of its own image ('text_x_visual').

    probs [B, kv, group, T, S>=T]; valid/vis [B, T] bool; img [B, T] int (-1 for text).
    Returns [B, T] float32 (meaningful at visual tokens).
    """
    t = valid.shape[1]
    pm = jnp.max(probs[..., :t].astype(jnp.float32), axis=(1, 2))  # [B, Tq, Tk]
    text_q = (valid & ~vis).astype(jnp.float32)
    cross = jnp.sum(pm * text_q[:, :, None], axis=1)
    if kind == "text":
        return cross
    same = (img[:, :, None] == img[:, None, :]) & (vis & valid)[:, :, None]  # [B, Tq, Tk]
    n_q = jnp.maximum(jnp.sum(same, axis=1), 1)
    return cross * jnp.sum(jnp.where(same, pm, 0.0), axis=1) / n_q


def rank_in_image(score, vis, img, descending: bool = True):
    """Rank of each visual token among its image's visual tokens (0 = highest score; ties by slot)."""
    t = score.shape[1]
    idx = jnp.arange(t)
    same = (img[:, :, None] == img[:, None, :]) & vis[:, None, :] & vis[:, :, None]
    s_me, s_other = score[:, :, None], score[:, None, :]
    better = (s_other > s_me) if descending else (s_other < s_me)
    ahead = better | ((s_other == s_me) & (idx[None, None, :] < idx[None, :, None]))
    return jnp.sum(same & ahead, axis=2)  # [B, T]


def _compaction_order(keep_mask, width: int):
    """Slots to gather so that kept tokens come last, in their order (left padding), `width` wide."""
    order = jnp.argsort(keep_mask.astype(jnp.int32), axis=1, stable=True)
    return order[:, order.shape[1] - width :]


def _take(x, order):
    if x.ndim == 2:
        return jnp.take_along_axis(x, order, axis=1)
    return jnp.take_along_axis(x, order[..., None], axis=1)


def _dropping_layer(cfg, p, state, keep: int, width: int, score_kind: str, cache=None, extra=0):
    """Attention on all entering tokens, then keep `keep` visual tokens per image."""
    h, pos, valid, vis, img, orig = state
    w = h.shape[1]
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, h.dtype)
    key_mask = (
        valid if cache is None else jnp.concatenate([valid, jnp.ones((h.shape[0], extra), bool)], 1)
    )
    mask = attention_mask_4d(key_mask, w, 0)
    x = RMSNorm(cfg.rms_norm_eps).apply({"params": p["input_layernorm"]}, h)
    o_in, probs, cache = attention(cfg, p["self_attn"], x, cos, sin, mask, cache)
    score = visual_scores(probs, valid, vis, img, score_kind)
    rank = rank_in_image(score, vis & valid, img)
    kept = valid & (~vis | (rank < keep))
    order = _compaction_order(kept, width)
    h, o_in = _take(h, order), _take(o_in, order)
    pos, vis, img, orig = (_take(a, order) for a in (pos, vis, img, orig))
    valid = _take(kept, order)
    h = h + o_in @ p["self_attn"]["o_proj"]["kernel"]
    x = RMSNorm(cfg.rms_norm_eps).apply({"params": p["post_attention_layernorm"]}, h)
    h = h + LlamaMLP(cfg).apply({"params": p["mlp"]}, x)
    return (h, pos, valid, vis, img, orig), cache


def prefill_layers(
    config: LlavaConfig,
    params: dict,
    embeds,
    input_ids,
    attention_mask,
    keep: tuple[int, ...],
    widths: tuple[int, ...],
    score_kind: str = "text",
    extra: int | None = None,
):
    """Runs the decoder layers with token dropping on merged embeddings [B, T, H].

    With `extra` (new tokens to come), builds a KV cache per layer, each `width_in + extra` long.
    Returns (hidden [B, W_L, H] before the final norm, state, caches, per-layer cache key masks),
    where state = (hidden, positions, valid, visual, image id, original slot) of the survivors.
    """
    cfg = config.text
    b, t = input_ids.shape
    n = config.num_image_tokens
    valid = attention_mask.astype(bool)
    vis = (input_ids == config.image_token_index) & valid
    img = jnp.where(vis, (jnp.cumsum(vis, axis=1) - 1) // n, -1)
    pos = positions_from_mask(attention_mask)
    orig = jnp.broadcast_to(jnp.arange(t), (b, t))
    state = (embeds, pos, valid, vis, img, orig)
    caches, key_masks, prev = [], [], n
    cos = sin = None
    for i, (k, width) in enumerate(zip(keep, widths)):
        h, pos, valid = state[0], state[1], state[2]
        w = h.shape[1]
        cache = None
        if extra is not None:
            shape = (b, w + extra, cfg.num_key_value_heads, cfg.head_dim)
            cache = {"k": jnp.zeros(shape, h.dtype), "v": jnp.zeros(shape, h.dtype)}
            key_masks.append(jnp.concatenate([valid, jnp.ones((b, extra), bool)], axis=1))
        if k < prev:
            state, cache = _dropping_layer(
                cfg, layer_params(params, i), state, k, width, score_kind, cache, extra or 0
            )
            cos = sin = None
        else:
            if cos is None:
                cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, h.dtype)
            key_mask = valid if extra is None else key_masks[-1]
            mask = attention_mask_4d(key_mask, w, 0)
            h, cache = LlamaDecoderLayer(cfg).apply(
                {"params": layer_params(params, i)}, h, cos, sin, mask, cache, 0
            )
            state = (h, *state[1:])
        caches.append(cache)
        prev = k
    return state[0], state, caches, key_masks


def _final_norm(config, params, h):
    return RMSNorm(config.text.rms_norm_eps).apply({"params": params["language_model"]["norm"]}, h)


_embed_jit = jax.jit(embed_inputs, static_argnums=0)


def _embed(config, params, input_ids, pixel_values):
    """Merged embeddings; compiled apart from the decoder, so a new recipe recompiles only that."""
    if isinstance(input_ids, jax.core.Tracer):
        return embed_inputs(config, params, input_ids, pixel_values)
    return _embed_jit(config, params, input_ids, pixel_values)


@partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _forward_core(config, params, embeds, input_ids, attention_mask, keep, widths, score):
    h, state, _, _ = prefill_layers(
        config, params, embeds, input_ids, attention_mask, keep, widths, score
    )
    logits = lm_head(config, params, _final_norm(config, params, h))
    b, t = input_ids.shape
    orig, valid = state[5], state[2]
    rows = jnp.arange(b)[:, None]
    full = jnp.zeros((b, t, logits.shape[-1]), logits.dtype).at[rows, orig].set(logits)
    kept = jnp.zeros((b, t), bool).at[rows, orig].set(valid)
    dropped = attention_mask.astype(bool) & ~kept
    return jnp.where(dropped[..., None], jnp.zeros((), full.dtype), full), kept


def _prepare(config, input_ids, pixel_values, attention_mask, recipe, score, widths, pad_to=1):
    keep = _keep_tuple(config, recipe)
    score = _score_kind(recipe, score)
    traced = isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer)
    if attention_mask is None:
        attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    if not traced:
        if pixel_values is not None:
            check_image_tokens(config, input_ids, pixel_values.shape[0])
        _check_last_token(config, input_ids, keep)
        if widths is None:
            widths = layer_widths(config, keep, input_ids, attention_mask, pad_to)
        input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    elif widths is None:  # traced inputs: no width is known, keep the full one (correct, no saving)
        widths = (jnp.shape(input_ids)[1],) * len(keep)
    return keep, score, tuple(int(w) for w in widths), input_ids, attention_mask


def forward_with_recipe(
    config: LlavaConfig,
    params: dict,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    recipe=None,
    *,
    score: str | None = None,
    widths: Sequence[int] | None = None,
    return_kept: bool = False,
):
    """LLaVA forward with FitPrune token dropping in the prefill: logits [B, T, vocab].

    Args:
      config, params, input_ids, pixel_values, attention_mask: as `ellava_jax.model.forward`.
      recipe: a `Recipe` (checked against `config`), or per-layer kept counts per image;
        None keeps every token (then the result equals `forward`).
      score: 'text' (attention from text tokens, the default) or 'text_x_visual'; by default
        the recipe's own.
      widths: static per-layer batch widths; computed from concrete inputs by default.
      return_kept: also return kept [B, T] bool (True where a token reached the last layer).

    Logits of dropped visual tokens (which no longer exist after their layer) are zero; text
    positions carry the pruned model's logits.
    """
    if recipe is None:
        recipe = (config.num_image_tokens,) * config.text.num_hidden_layers
    keep, score, widths, input_ids, attention_mask = _prepare(
        config, input_ids, pixel_values, attention_mask, recipe, score, widths
    )
    embeds = _embed(config, params, input_ids, pixel_values)
    logits, kept = _forward_core(
        config, params, embeds, input_ids, attention_mask, keep, widths, score
    )
    return (logits, kept) if return_kept else logits


@partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _last_core(config, params, embeds, input_ids, attention_mask, keep, widths, score):
    h, _, _, _ = prefill_layers(
        config, params, embeds, input_ids, attention_mask, keep, widths, score
    )
    h = _final_norm(config, params, h[:, -1])
    return lm_head(config, params, h).astype(jnp.float32)


def last_logits_with_recipe(
    config: LlavaConfig,
    params: dict,
    input_ids,
    pixel_values,
    attention_mask,
    recipe,
    *,
    pad_to: int = 8,
):
    """Next-token logits after each (left-padded) prompt, FitPrune prefill: [B, V] float32.

    The pruned counterpart of `ellava_jax.eval.harness.last_logits` (only the last position
    goes through the head). Widths are rounded up to `pad_to` to share compilations.
    """
    keep, score, widths, input_ids, attention_mask = _prepare(
        config, input_ids, pixel_values, attention_mask, recipe, None, None, pad_to
    )
    embeds = _embed(config, params, input_ids, pixel_values)
    return _last_core(config, params, embeds, input_ids, attention_mask, keep, widths, score)


def recipe_last_logits(recipe):
    """`f(config, params, input_ids, pixel_values, attention_mask) -> [B, V]` for a recipe:
    what the evaluation harness takes as `logits_fn`."""

    def logits_fn(config, params, input_ids, pixel_values, attention_mask):
        return last_logits_with_recipe(
            config, params, input_ids, pixel_values, attention_mask, recipe
        )

    return logits_fn


@partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _generate_core(config, params, embeds, input_ids, attention_mask, keep, widths, score, max_new):
    cfg = config.text
    h, state, caches, key_masks = prefill_layers(
        config, params, embeds, input_ids, attention_mask, keep, widths, score, extra=max_new
    )
    logits = lm_head(config, params, _final_norm(config, params, h[:, -1:]))
    starts = [km.shape[1] - max_new for km in key_masks]  # each layer's prefill length
    last_pos = positions_from_mask(attention_mask)[:, -1]
    layers = [layer_params(params, i) for i in range(cfg.num_hidden_layers)]

    def step(i, tok, caches):
        """One new token through every layer, each attending to its own reduced cache."""
        x = embed_text(config, params, tok[:, None])
        cos, sin = rope_cos_sin((last_pos + i)[:, None], cfg.head_dim, cfg.rope_theta, x.dtype)
        new_caches = []
        for layer in range(cfg.num_hidden_layers):
            idx = starts[layer] + i - 1
            mask = attention_mask_4d(key_masks[layer], 1, idx)
            x, c = LlamaDecoderLayer(cfg).apply(
                {"params": layers[layer]}, x, cos, sin, mask, caches[layer], idx
            )
            new_caches.append(c)
        return lm_head(config, params, _final_norm(config, params, x)), new_caches

    return greedy_decode(cfg, logits, caches, step, max_new)


def generate_with_recipe(
    config: LlavaConfig,
    params: dict,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    recipe=None,
    max_new_tokens: int = 16,
    *,
    score: str | None = None,
    widths: Sequence[int] | None = None,
):
    """Greedy generation after a FitPrune prefill; decoding attends to each layer's reduced cache.

    Same contract as `ellava_jax.model.generate`: returns [B, T + n] token ids (the prompt, then
    n <= max_new_tokens new tokens), rows that emitted eos continue with pad, and the output is
    cut once every row has finished. A keep-all recipe (or None) gives `generate`'s tokens.
    """
    if recipe is None:
        recipe = (config.num_image_tokens,) * config.text.num_hidden_layers
    input_ids = np.asarray(input_ids)
    keep, score, widths, ids, mask = _prepare(
        config, input_ids, pixel_values, attention_mask, recipe, score, widths
    )
    ids = ids.astype(jnp.int32)
    embeds = _embed(config, params, ids, pixel_values)
    new = _generate_core(config, params, embeds, ids, mask, keep, widths, score, max_new_tokens)
    return append_new_tokens(input_ids, new, config.text.eos_token_id)

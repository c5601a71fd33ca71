"""Greedy decoding with a KV cache, as HF `generate(do_sample=False)` does it.

The loop itself (`greedy_decode`, traced) and the cut after every row's eos (`append_new_tokens`,
eager) serve every decoder of the project: `generate` here, on the model's own prefill and cache,
and `ellava_jax.tokens.apply.generate_with_recipe`, on FitPrune's reduced per-layer caches.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig, TextConfig
from ellava_jax.model.llama import init_cache, positions_from_mask
from ellava_jax.model.llava import (
    check_image_tokens,
    decode,
    embed_inputs,
    embed_text,
    refuse_images,
)

# step(i, token [B] int32, cache) -> (logits [B, T, V], cache): feeds new token i - 1 (the
# prompt is already in the cache) and returns the logits whose last position predicts token i.
Step = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, object]]


def greedy_decode(text: TextConfig, prefill_logits, cache, step: Step, max_new_tokens: int):
    """Greedy tokens after a prefill: [B, max_new_tokens] int32 (traceable; a `fori_loop`).

    prefill_logits [B, T, V]: the prefill's, whose last position gives the first new token;
    cache: what `step` carries (any pytree, the same structure out as in). Like HF, a row that
    emitted `text.eos_token_id` continues with `text.pad_token_id` (eos when there is no pad).
    """
    eos = text.eos_token_id
    pad = text.pad_token_id if text.pad_token_id is not None else eos
    first = jnp.argmax(prefill_logits[:, -1], axis=-1).astype(jnp.int32)
    b = first.shape[0]
    done = jnp.zeros((b,), bool) if eos is None else first == eos
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
        out, cache, done = carry
        logits, cache = step(i, out[:, i - 1], cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        if eos is not None:
            nxt = jnp.where(done, pad, nxt)
            done = done | (nxt == eos)
        return out.at[:, i].set(nxt), cache, done

    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, body, (out, cache, done))
    return out


def append_new_tokens(prompt: np.ndarray, new, eos: int | None) -> np.ndarray:
    """[B, T + n]: the prompt, then the new tokens cut once every row has emitted `eos`
    (n <= new.shape[1]; nothing is cut without an eos). The prompt's dtype wins."""
    new = np.asarray(new)
    if eos is not None:
        finished = np.cumsum(new == eos, axis=1) > 0  # [B, n]
        all_done = np.nonzero(finished.all(axis=0))[0]
        if all_done.size:
            new = new[:, : all_done[0] + 1]
    return np.concatenate([prompt, new], axis=1)


@partial(jax.jit, static_argnums=(0, 5))
def _generate(config: LlavaConfig, params, input_ids, pixel_values, attention_mask, max_new_tokens):
    b, t = input_ids.shape
    total = t + max_new_tokens
    dtype = params["language_model"]["embed_tokens"]["embedding"].dtype
    caches = init_cache(config.text, b, total, dtype)
    key_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((b, max_new_tokens), jnp.int32)], axis=1
    )
    positions = positions_from_mask(attention_mask)
    embeds = embed_inputs(config, params, input_ids, pixel_values)
    logits, caches = decode(config, params, embeds, key_mask, positions, caches, 0)
    last_pos = positions[:, -1]

    def step(i, tok, caches):
        pos = (last_pos + i)[:, None]
        emb = embed_text(config, params, tok[:, None])
        return decode(config, params, emb, key_mask, pos, caches, t + i - 1)

    return greedy_decode(config.text, logits, caches, step, max_new_tokens)


def generate(
    config: LlavaConfig,
    params: dict,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    max_new_tokens: int = 16,
):
    """Greedy generation. Returns [B, T + n] token ids (prompt then new tokens), n <= max_new_tokens.

    Like HF, a row that emitted `eos_token_id` continues with `pad_token_id`, and generation
    stops (the output is cut) once every row has finished.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    refuse_images(config, pixel_values)
    if pixel_values is not None:
        check_image_tokens(config, input_ids, pixel_values.shape[0])
    new = _generate(
        config, params, input_ids, pixel_values, jnp.asarray(attention_mask), max_new_tokens
    )
    return append_new_tokens(np.asarray(input_ids), new, config.text.eos_token_id)

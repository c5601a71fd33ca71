"""Greedy decoding with a KV cache, as HF `generate(do_sample=False)` does it."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.model.llama import init_cache, positions_from_mask
from ellava_jax.model.llava import check_image_tokens, decode, embed_inputs, embed_text


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
    eos = config.text.eos_token_id
    pad = config.text.pad_token_id if config.text.pad_token_id is not None else eos
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    done = jnp.zeros((b,), bool) if eos is None else first == eos
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    last_pos = positions[:, -1]

    def step(i, carry):
        out, caches, done = carry
        tok = out[:, i - 1]
        pos = (last_pos + i)[:, None]
        emb = embed_text(config, params, tok[:, None])
        logits, caches = decode(config, params, emb, key_mask, pos, caches, t + i - 1)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        if eos is not None:
            nxt = jnp.where(done, pad, nxt)
            done = done | (nxt == eos)
        return out.at[:, i].set(nxt), caches, done

    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, caches, done))
    return out


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
    if pixel_values is not None:
        check_image_tokens(config, input_ids, pixel_values.shape[0])
    new = np.asarray(
        _generate(
            config, params, input_ids, pixel_values, jnp.asarray(attention_mask), max_new_tokens
        )
    )
    eos = config.text.eos_token_id
    if eos is not None:
        finished = np.cumsum(new == eos, axis=1) > 0  # [B, n]
        all_done = np.nonzero(finished.all(axis=0))[0]
        if all_done.size:
            new = new[:, : all_done[0] + 1]
    return np.concatenate([np.asarray(input_ids), new], axis=1)

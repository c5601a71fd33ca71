"""Language-model losses shared by evaluation, the search's fitness and FitPrune's fit:
next-token targets and the summed NLL or KL of masked positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ellava_jax.config import LlavaConfig


def next_token_targets(config: LlavaConfig, input_ids, attention_mask):
    """(labels, label_mask): position t predicts token t+1 when both are real and t+1 is text."""
    ids = jnp.asarray(input_ids)
    mask = jnp.asarray(attention_mask)
    labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    nxt_real = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    lm = (mask > 0) & (nxt_real > 0) & (labels != config.image_token_index)
    return labels, lm.astype(jnp.float32)


def token_loss_sum(logits, labels, label_mask, dense_logp=None):
    """(sum over masked positions, count): next-token NLL, or KL(dense || model) when
    `dense_logp` (the dense model's log-probabilities) is given. logits [..., T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if dense_logp is None:
        per_tok = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    else:
        per_tok = (jnp.exp(dense_logp) * (dense_logp - logp)).sum(-1)
    return (per_tok * label_mask).sum(), label_mask.sum()

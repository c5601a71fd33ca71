"""Multiple-choice VQA accuracy (ScienceQA-style jsonl or the toy's test split) and proxy perplexity.

Scoring:
  generate    greedy decoding of the answer: the model's first token after the LLaVA-1.5
              prompt, decoded; the answer is the letter it starts with (anything else is wrong)
  likelihood  the option letter with the highest log-probability among the record's options

Accuracy is reported overall and per category (the paper's Table 3 columns at toy scale).

A text-only model (a plain LLaMA, `config.is_text_only`) takes records without images only: the
same LLaVA-1.5 prompt without the image line (no chat template), after the tokenizer's `<s>`
when it has one (a byte-level tokenizer without it, e.g. SmolLM2's, gets no bos). A record with
an image is refused, naming its file and line, before any compute.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ellava_jax.config import LlavaConfig
from ellava_jax.data import prompt as T
from ellava_jax.data.images import load_pixels, pixel_values
from ellava_jax.data.records import LETTERS, Record, load_records
from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file, check_image_header, confined_image
from ellava_jax.model.llava import decode, embed_inputs, lm_head
from ellava_jax.model.losses import next_token_targets, token_loss_sum

SCORINGS = ("generate", "likelihood")


@partial(jax.jit, static_argnums=0)
def last_logits(config: LlavaConfig, params, input_ids, pixel_values, attention_mask):
    """Logits of the next token after each (left-padded) prompt: [B, V]."""
    embeds = embed_inputs(config, params, input_ids, pixel_values)
    hidden, _ = decode(config, params, embeds, attention_mask, return_hidden=True)
    return lm_head(config, params, hidden[:, -1]).astype(jnp.float32)


def _where(jsonl_path, record: Record, index: int) -> str:
    """'file.jsonl:LINE' of a record read from a file, else 'record N' (1-based)."""
    if jsonl_path is not None and record.line is not None:
        return f"{jsonl_path}:{record.line}"
    return f"{jsonl_path}: record {index + 1}" if jsonl_path is not None else f"record {index + 1}"


def record_image(jsonl_path, record: Record, index: int = 0, image_root=None):
    """The checked file of a record's image (`inputs.confined_image`): relative to the jsonl's
    directory and inside it, or inside `image_root` when given."""

    if jsonl_path is None:
        raise UserError(f"record {index + 1}: image {record.image!r} without a jsonl file")
    return confined_image(record.image, jsonl_path, _where(jsonl_path, record, index), image_root)


def _pixels(records: list[Record], jsonl_path, model_dir, config, image_root=None) -> np.ndarray:

    out = []
    for i, r in enumerate(records):
        if r.pixels is not None:
            out.append(pixel_values(r.pixels)[0])
        else:
            path = record_image(jsonl_path, r, i, image_root)
            where = _where(jsonl_path, r, i)
            out.append(load_pixels(str(path), model_dir, config, where=where))
    return np.stack(out)


def refuse_images(config: LlavaConfig, records: list[Record], jsonl_path=None) -> None:
    """A record with an image, for a text-only model, is a `UserError` naming file and line."""
    if not config.is_text_only:
        return
    for i, r in enumerate(records):
        if r.has_image:
            what = f"image {r.image!r}" if r.image is not None else "an image"
            raise UserError(
                f"{_where(jsonl_path, r, i)}: the record has {what}, but the model is a "
                "text-only LLaMA (no vision tower); give records without 'image'"
            )


def prompt_ids(tok, record: Record, num_image_tokens: int) -> list[int]:
    """A record's prompt ids (`prompt.encode_record`); a tokenizer without `<s>` (a plain
    LLaMA's byte-level BPE, e.g. SmolLM2's) gets the same prompt without a bos."""
    if T._backend(tok).token_to_id(T.BOS) is None:
        text = T.expand_image_tokens(T.format_prompt(record), num_image_tokens)
        return T.encode_text(tok, text, add_bos=False)
    return T.encode_record(tok, record, num_image_tokens)[0]


def check_prompt_lengths(
    config: LlavaConfig, tok, records: list[Record], jsonl_path=None
) -> list[list[int]]:
    """The records' prompt ids; a prompt longer than the model's context (image tokens
    included), or a record with an image for a text-only model (`refuse_images`), is a
    `UserError` naming the jsonl file and line, raised before any compute."""
    refuse_images(config, records, jsonl_path)
    context = config.text.max_position_embeddings
    n = config.num_image_tokens
    rows = []
    for i, r in enumerate(records):
        ids = prompt_ids(tok, r, n)
        if len(ids) > context:
            image = f" ({n} image tokens included)" if r.has_image else ""
            raise UserError(
                f"{_where(jsonl_path, r, i)}: the prompt has {len(ids)} tokens{image}, more "
                f"than the model's context of {context}"
            )
        rows.append(ids)
    return rows


def _round_up(n: int, k: int = 16) -> int:
    return ((n + k - 1) // k) * k


def evaluate_records(
    config: LlavaConfig,
    params: dict,
    tok,
    records: list[Record],
    *,
    jsonl_path: str | None = None,
    model_dir: str | None = None,
    scoring: str = "generate",
    batch_size: int = 32,
    progress: bool = True,
    logits_fn=None,
    image_root: str | None = None,
) -> dict:
    """Accuracy of a model on multiple-choice records.

    Args:
      tok: the model's tokenizer (transformers or `tokenizers`).
      records: multiple-choice records (images in memory or as paths relative to jsonl_path).
      scoring: "generate" or "likelihood" (see the module docstring).
      logits_fn: replaces `last_logits` (e.g. a FitPrune token-pruned prefill); same signature.
      image_root: the folder image files may come from (default: the jsonl's directory).

    Raises:
      UserError: a prompt longer than the model's context (before any compute), an image path
        outside the allowed folder, or an image file that is not an image; naming file and line.

    Returns:
      {"accuracy", "n", "correct", "per_category": {cat: acc}, "per_category_n", "scoring"}.
    """
    # Over 80 lines on purpose: one batched pass (prompt, image, score, tally) per chunk.
    if scoring not in SCORINGS:
        raise UserError(f"scoring {scoring!r}: expected one of {SCORINGS}")
    if not records:
        raise UserError(f"{jsonl_path or 'evaluation'}: no records to evaluate")
    encoded = check_prompt_lengths(config, tok, records, jsonl_path)
    logits_fn = logits_fn or last_logits
    pad = T.token_id(tok, T.PAD) if T._backend(tok).token_to_id(T.PAD) is not None else 0
    letters = T.letter_ids(tok)
    correct = np.zeros(len(records), bool)
    groups = [
        [i for i, r in enumerate(records) if r.has_image],
        [i for i, r in enumerate(records) if not r.has_image],
    ]
    bar = tqdm(total=len(records), desc="eval", unit="q", disable=not progress)
    for group in groups:
        for s in range(0, len(group), batch_size):
            idx = group[s : s + batch_size]
            n = len(idx)
            chunk = [records[i] for i in idx]
            idx_full = idx + [idx[-1]] * (batch_size - n)  # fixed batch shape
            chunk_full = [records[i] for i in idx_full]
            rows = [encoded[i] for i in idx_full]
            t = _round_up(max(len(r) for r in rows))
            ids = np.full((batch_size, t), pad, np.int32)
            mask = np.zeros((batch_size, t), np.int32)
            for j, r in enumerate(rows):
                ids[j, t - len(r) :] = r
                mask[j, t - len(r) :] = 1
            pix = (
                jnp.asarray(_pixels(chunk_full, jsonl_path, model_dir, config, image_root))
                if chunk[0].has_image
                else None
            )
            logits = np.asarray(
                logits_fn(config, params, jnp.asarray(ids), pix, jnp.asarray(mask))
            )[:n]
            for j, r in enumerate(chunk):
                k = len(r.choices)
                if scoring == "likelihood":
                    pred = int(np.argmax(logits[j, letters[:k]]))
                else:
                    text = T._backend(tok).decode([int(np.argmax(logits[j]))]).strip()
                    pred = LETTERS.index(text[0]) if text and text[0] in LETTERS[:k] else -1
                correct[idx[j]] = pred == r.answer
            bar.update(n)
    bar.close()
    per_cat, per_n = defaultdict(int), defaultdict(int)
    for r, c in zip(records, correct):
        per_cat[r.category] += int(c)
        per_n[r.category] += 1
    return {
        "accuracy": float(correct.mean()),
        "n": len(records),
        "correct": int(correct.sum()),
        "per_category": {k: per_cat[k] / per_n[k] for k in sorted(per_n)},
        "per_category_n": dict(sorted(per_n.items())),
        "scoring": scoring,
    }


@partial(jax.jit, static_argnums=0)
def _nll(config, params, ids, mask):

    embeds = embed_inputs(config, params, ids, None)
    logits, _ = decode(config, params, embeds, mask)
    labels, lmask = next_token_targets(config, ids, mask)
    return token_loss_sum(logits, labels, lmask)


def perplexity(
    config: LlavaConfig, params: dict, input_ids, attention_mask, batch_size: int = 16
) -> float:
    """exp(mean next-token NLL) over the real tokens of text segments."""
    tot = cnt = 0.0
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    for s in range(0, len(ids), batch_size):
        a, b = _nll(
            config,
            params,
            jnp.asarray(ids[s : s + batch_size]),
            jnp.asarray(mask[s : s + batch_size]),
        )
        tot, cnt = tot + float(a), cnt + float(b)
    return math.exp(tot / max(cnt, 1.0))


def load_eval_records(
    data: str | None,
    limit: int | None = None,
    image_root: str | None = None,
    config: LlavaConfig | None = None,
) -> tuple[list[Record], str | None]:
    """(records, jsonl path) of a jsonl file of multiple-choice records.

    A file is checked whole before any compute: it must hold records, and the images of the
    first `limit` must stay inside the jsonl's directory (or `image_root`) and be image files.
    With a text-only `config`, a record with an image is refused first (`refuse_images`).
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit}: evaluate at least 1 record")
    check_file(data, "evaluation file")
    recs = load_records(data)
    if not recs:
        raise UserError(f"{data}: no records (an empty evaluation file)")
    recs = recs if limit is None else recs[:limit]
    if config is not None:
        refuse_images(config, recs, data)
    for i, r in enumerate(recs):
        if r.image is not None:
            check_image_header(record_image(data, r, i, image_root), _where(data, r, i))
    return recs, data

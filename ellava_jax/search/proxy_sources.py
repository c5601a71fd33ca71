"""Proxy samples (text segments and image + text samples), as calibration and the search read
them: `ProxyData`, random ones for random-weight models, and ones read from the user's files.

Which of them a model gets is the command layer's choice (`app/sources.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.data.images import read_multimodal_jsonl, rows_pixels
from ellava_jax.data.segments import proxy_segments, random_segments, read_proxy_text
from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file


@dataclass(frozen=True)
class ProxyData:
    text_ids: np.ndarray  # [N_t, T_t]
    text_mask: np.ndarray
    mm_ids: np.ndarray  # [N_m, T_m] with image placeholders
    mm_mask: np.ndarray
    mm_pixels: np.ndarray  # [N_img, C, S, S]

    def calibration_batches(self):
        """The (ids, mask, pixels) groups `build_calibration_set` takes."""
        out = [(self.text_ids, self.text_mask, None)]
        if len(self.mm_ids):
            out.append((self.mm_ids, self.mm_mask, self.mm_pixels))
        return out


def no_images(config: LlavaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mm_ids, mm_mask, mm_pixels) of no image + text samples; pixels [0, 3, 1, 1] for a
    text-only config (it has no image size)."""
    v = config.vision
    c, s = (3, 1) if v is None else (v.num_channels, v.image_size)
    return (
        np.zeros((0, 1), np.int64),
        np.zeros((0, 1), np.int64),
        np.zeros((0, c, s, s), np.float32),
    )


def length_buckets(lengths, max_buckets: int = 4, min_size: int = 8) -> list[np.ndarray]:
    """Rows grouped by length so that each group pads only to its own longest row.

    The rows, sorted by length, are cut into at most `max_buckets` groups of equal count (at
    least `min_size` rows each); neighbouring groups with the same longest row are merged, so
    rows of one length stay one group. Returns row indices per group, shortest group first.
    The toy's 32 multimodal samples (103-178 tokens) pad to 4,520 positions in 4 groups against
    5,696 as one batch; its 64 text segments (all 128 tokens) stay one group.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    k = int(max(1, min(max_buckets, len(order) // max(min_size, 1))))
    groups: list[np.ndarray] = []
    for g in np.array_split(order, k):
        if groups and lengths[groups[-1]].max() == lengths[g].max():
            groups[-1] = np.concatenate([groups[-1], g])
        elif len(g):
            groups.append(g)
    return groups


def random_proxy(
    config: LlavaConfig, n_text: int, seq_len: int, n_mm: int, seed: int = 0
) -> ProxyData:
    """Random tokens and images: calibration for random-weight models (tests, `tiny`). A
    text-only config gets text segments alone (`n_mm` is ignored: it has no images)."""

    if config.is_text_only:
        ids, mask = random_segments(config.text.vocab_size, n_text, seq_len, seed)
        return ProxyData(ids, mask, *no_images(config))
    rng = np.random.default_rng(seed + 1)
    ids, mask = random_segments(config.image_token_index, n_text, seq_len, seed)
    n_img = config.num_image_tokens
    tail = max(4, seq_len // 8)
    mm = np.concatenate(
        [
            rng.integers(3, config.image_token_index, (n_mm, 2)),
            np.full((n_mm, n_img), config.image_token_index),
            rng.integers(3, config.image_token_index, (n_mm, tail)),
        ],
        axis=1,
    )
    v = config.vision
    pix = rng.standard_normal((n_mm, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return ProxyData(ids, mask, mm, np.ones_like(mm), pix)


def file_proxy(
    config: LlavaConfig,
    tokenizer_dir: str,
    text_file: str,
    n_text: int,
    seq_len: int,
    seed: int = 0,
    mm_file: str | None = None,
    n_mm: int = 0,
    image_root: str | None = None,
    text_segments=None,
) -> ProxyData:
    """Text segments from `text_file` (text or jsonl, e.g. PTB); image + text samples from
    `mm_file` (jsonl rows with `image` and `text`), tokenised with the model's own tokenizer.
    `text_segments(tokenizer) -> (ids, mask)` draws the text segments instead of `text_file`
    (a named source such as the Bible)."""
    from transformers import AutoTokenizer  # here, not at the top: it takes seconds to import

    if text_segments is None:
        read_proxy_text(text_file)  # a missing or empty file, before the tokenizer loads
    if mm_file:
        if config.is_text_only:
            raise UserError(
                f"proxy_multimodal={mm_file!r}: the model is a text-only LLaMA (no vision tower, "
                "no projector); remove proxy_multimodal and search on the text proxy alone"
            )
        check_file(mm_file, "multimodal jsonl file")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if text_segments is None:
        ids, mask = proxy_segments(text_file, tok, n_text, seq_len, seed)
    else:
        ids, mask = text_segments(tok)
    if not mm_file:
        return ProxyData(ids, mask, *no_images(config))
    rows = read_multimodal_jsonl(mm_file, image_root, limit=n_mm)
    pix = rows_pixels(mm_file, rows, tokenizer_dir, config)
    seqs = []
    context = config.text.max_position_embeddings
    for r in rows:
        text = tok(r["text"], add_special_tokens=False)["input_ids"]
        seqs.append(
            [tok.bos_token_id or 1] + [config.image_token_index] * config.num_image_tokens + text
        )
        if len(seqs[-1]) > context:
            raise UserError(
                f"{mm_file}:{r['line']}: the sample has {len(seqs[-1])} tokens "
                f"({config.num_image_tokens} image tokens included), more than the model's "
                f"context of {context}"
            )
    t = max(len(s) for s in seqs)
    mm = np.full((len(seqs), t), tok.pad_token_id or 0)
    mm_mask = np.zeros((len(seqs), t), np.int64)
    for i, s in enumerate(seqs):
        mm[i, t - len(s) :] = s
        mm_mask[i, t - len(s) :] = 1
    return ProxyData(ids, mask, mm, mm_mask, pix)

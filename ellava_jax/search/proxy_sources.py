"""Where the search's proxy samples come from: text segments and image + text samples.

`tiny` draws random tokens and images (seeded); the shipped toy uses its own proxy data (never
its evaluation split); any other model takes local files: `proxy_text` (a text or jsonl file,
e.g. PTB) and `proxy_multimodal` (jsonl records with `image` and `text`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ellava_jax.config import LlavaConfig


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
    """Random tokens and images: calibration for random-weight models (tests, `tiny`)."""
    from ellava_jax.data.segments import random_segments

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


def file_proxy(settings, config: LlavaConfig, model_dir: str) -> ProxyData:
    """Proxy text from `settings.proxy_text`; image + text samples from `settings.proxy_multimodal`."""
    from transformers import AutoTokenizer

    from ellava_jax.data.segments import proxy_segments

    if not settings.proxy_text:
        raise ValueError(
            f"{model_dir}: set proxy_text (a local text file such as PTB) in the search config"
        )
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, mask = proxy_segments(
        settings.proxy_text, tok, settings.proxy_segments, settings.proxy_seq_len, settings.seed
    )
    v = config.vision
    empty = ProxyData(
        ids,
        mask,
        np.zeros((0, 1), np.int64),
        np.zeros((0, 1), np.int64),
        np.zeros((0, v.num_channels, v.image_size, v.image_size), np.float32),
    )
    if not settings.proxy_multimodal:
        return empty
    from ellava_jax.data.images import load_pixels, read_multimodal_jsonl

    rows = read_multimodal_jsonl(settings.proxy_multimodal)[: settings.proxy_multimodal_samples]
    base = os.path.dirname(os.path.abspath(settings.proxy_multimodal))
    pix = np.stack([load_pixels(os.path.join(base, r["image"]), model_dir, config) for r in rows])
    seqs = []
    for r in rows:
        text = tok(r["text"], add_special_tokens=False)["input_ids"]
        seqs.append(
            [tok.bos_token_id or 1] + [config.image_token_index] * config.num_image_tokens + text
        )
    t = max(len(s) for s in seqs)
    mm = np.full((len(seqs), t), tok.pad_token_id or 0)
    mm_mask = np.zeros((len(seqs), t), np.int64)
    for i, s in enumerate(seqs):
        mm[i, t - len(s) :] = s
        mm_mask[i, t - len(s) :] = 1
    return ProxyData(ids, mask, mm, mm_mask, pix)


def load_proxy(settings, config: LlavaConfig, model_dir: str | None) -> ProxyData:
    """The proxy samples for a search (see the module docstring)."""
    if model_dir is None:
        return random_proxy(
            config,
            settings.proxy_segments,
            settings.proxy_seq_len,
            settings.proxy_multimodal_samples,
            settings.seed,
        )
    from ellava_jax.models import toy_dir

    if os.path.realpath(model_dir) == os.path.realpath(toy_dir()) and not settings.proxy_text:
        from ellava_jax.data import toy_proxy

        return toy_proxy.search_proxy(config, settings)
    return file_proxy(settings, config, model_dir)

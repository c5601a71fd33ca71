"""The shipped toy's own proxy data for calibration and the search (never its evaluation split).

Text: segments of the proxy text stream (stated facts and scene descriptions, the role PTB plays
in the paper). Multimodal: image + description pairs of proxy scenes, as LLaVA turns.
"""

from __future__ import annotations

import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.data import scenes
from ellava_jax.data import tokenizer as T
from ellava_jax.data.batches import pad_left
from ellava_jax.data.proxy import multimodal_samples, proxy_text_segments
from ellava_jax.data.segments import segments_from_ids


def _tokenizer():
    from ellava_jax.models import toy_dir

    return T.load_tokenizer(toy_dir())


def text_segments(n: int, seq_len: int, seed: int = 0):
    """(ids, mask) [n, seq_len]: random windows of the tokenised proxy text stream."""
    tok = _tokenizer()
    text = " ".join(proxy_text_segments(max(8, n * seq_len // 40), seed=seed))
    ids = np.asarray(T.encode_text(tok, text, add_bos=False))
    seg = segments_from_ids(ids, n, seq_len, seed)
    return seg, np.ones_like(seg)


def multimodal(config: LlavaConfig, n: int, seed: int = 0):
    """(ids, mask, pixel_values) of n image + description samples (proxy scenes)."""
    tok = _tokenizer()
    samples = multimodal_samples(n, seed=seed)
    rows = [T.encode_caption(tok, s.text, config.num_image_tokens) for s in samples]
    length = max(len(r[0]) for r in rows)
    b = pad_left(rows, length, T.token_id(tok, T.PAD))
    pix = scenes.pixel_values(np.stack([s.pixels for s in samples]))
    return b["input_ids"], b["attention_mask"], pix


def calibration_batches(
    config: LlavaConfig,
    n_segments: int,
    seq_len: int,
    seed: int = 0,
    n_multimodal: int | None = None,
):
    """`ellava prune`'s calibration data for the toy: text segments plus image + text samples."""
    ids, mask = text_segments(n_segments, seq_len, seed)
    n_mm = n_segments // 2 if n_multimodal is None else n_multimodal
    out = [(ids, mask, None)]
    if n_mm:
        out.append(multimodal(config, n_mm, seed))
    return out


def search_proxy(config: LlavaConfig, settings):
    """The search's `ProxyData` for the toy."""
    from ellava_jax.search.proxy_sources import ProxyData

    ids, mask = text_segments(settings.proxy_segments, settings.proxy_seq_len, settings.seed)
    mm_ids, mm_mask, pix = multimodal(config, settings.proxy_multimodal_samples, settings.seed)
    return ProxyData(ids, mask, mm_ids, mm_mask, pix)

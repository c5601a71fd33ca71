"""What the shipped toy hands the library: where it lives, its proxy data for calibration, the
search and FitPrune (never its evaluation split), its test split and its perplexity text.

Text proxy: segments of the proxy text stream (stated facts and scene descriptions, the role PTB
plays in the paper). Multimodal proxy: image + description pairs of proxy scenes, as LLaVA
turns. Everything is plain arrays and records; the command layer (`app/sources.py`) wraps them
in the library's types.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.data import prompt as T
from ellava_jax.data.images import pixel_values
from ellava_jax.data.records import Record
from ellava_jax.data.segments import segments_from_ids
from ellava_jax.toy.batches import pad_left
from ellava_jax.toy.questions import generate_split
from ellava_jax.toy.stream import multimodal_samples, proxy_text_segments

NAME = "toy"


def model_dir() -> str:
    """Directory of the shipped, trained toy LLaVA (HF format), inside the installed package."""
    return str(resources.files("ellava_jax") / "assets" / NAME)


def _tokenizer():
    return T.load_tokenizer(model_dir())


def text_segments(n: int, seq_len: int, seed: int = 0):
    """(ids, mask) [n, seq_len]: random windows of the tokenised proxy text stream."""
    tok = _tokenizer()
    text = " ".join(proxy_text_segments(max(8, n * seq_len // 40), seed=seed))
    ids = np.asarray(T.encode_text(tok, text, add_bos=False))
    seg = segments_from_ids(ids, n, seq_len, seed)
    return seg, np.ones_like(seg)


def multimodal(config: LlavaConfig, n: int, seed: int = 0):
    """(ids, mask, pixel_values) of n image + description samples (proxy scenes).

    Each is the caption turn `USER: <image>\\nDescribe the picture. ASSISTANT: {description}</s>`
    (`data.prompt.encode_caption`): the description is the text that attends to the image.
    """
    tok = _tokenizer()
    samples = multimodal_samples(n, seed=seed)
    rows = [T.encode_caption(tok, s.text, config.num_image_tokens) for s in samples]
    length = max(len(r[0]) for r in rows)
    b = pad_left(rows, length, T.token_id(tok, T.PAD))
    pix = pixel_values(np.stack([s.pixels for s in samples]))
    return b["input_ids"], b["attention_mask"], pix


def test_records(limit: int | None = None) -> list[Record]:
    """The toy's held-out test split (records with their images in memory)."""
    recs = [r for r, _ in generate_split("test")]
    return recs if limit is None else recs[:limit]


def perplexity_segments(tok, n: int = 32, seq_len: int = 64):
    """(ids, mask) of held-out proxy text (its own seed) for the toy's perplexity figure."""
    text = " ".join(proxy_text_segments(n * 4, seed=12345))
    ids = np.asarray(T.encode_text(tok, text, add_bos=False))
    seg = segments_from_ids(ids, n, seq_len, seed=0)
    return seg, np.ones_like(seg)

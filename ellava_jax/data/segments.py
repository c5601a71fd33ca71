"""Proxy text segments (the role PTB plays in the paper): n random windows of a token stream.

`--proxy FILE` takes a local text file (`.txt`: the whole file is one stream) or a jsonl file
(one object per line with a `text` field). A user with PTB on disk passes it here.
"""

from __future__ import annotations

import numpy as np

from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file, jsonl_objects


def read_proxy_text(path: str) -> str:
    """The text of a proxy file (.txt or .jsonl with a `text` field per line); a missing file,
    a directory or a file without text is a UserError naming it."""
    text = _read_proxy_text(check_file(path, "proxy file"))
    if not text.strip():
        raise UserError(f"{path}: proxy stream has 0 tokens (an empty proxy file)")
    return text


def _read_proxy_text(path: str) -> str:
    if path.endswith((".jsonl", ".json")):
        parts = []
        for _, where, obj in jsonl_objects(path, "proxy file"):
            if not isinstance(obj.get("text"), str):
                raise UserError(f"{where}: expected an object with a string 'text' field")
            parts.append(obj["text"])
        return "\n".join(parts)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None


def segments_from_ids(ids: np.ndarray, n_segments: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """n random windows of seq_len tokens from a 1-D token stream: [n, seq_len].

    SparseGPT's sampling: a uniformly random start per segment.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size <= seq_len:
        raise ValueError(f"proxy stream has {ids.size} tokens, fewer than one segment of {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seq_len, n_segments)
    return np.stack([ids[s : s + seq_len] for s in starts])


def proxy_segments(path: str, tokenizer, n_segments: int = 64, seq_len: int = 256, seed: int = 0):
    """Tokenised proxy file -> (input_ids [n, seq_len], attention_mask [n, seq_len])."""
    text = read_proxy_text(path)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.size <= seq_len:
        raise UserError(
            f"{path}: proxy stream has {ids.size} tokens; one segment of {seq_len} tokens "
            f"needs at least {seq_len + 1}"
        )
    seg = segments_from_ids(ids, n_segments, seq_len, seed)
    return seg, np.ones_like(seg)


def random_segments(vocab_size: int, n_segments: int, seq_len: int, seed: int = 0, low: int = 3):
    """Random-token segments: calibration for models without a tokenizer (the `tiny` preset)."""
    rng = np.random.default_rng(seed)
    seg = rng.integers(low, vocab_size, (n_segments, seq_len))
    return seg, np.ones_like(seg)

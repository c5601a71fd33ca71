"""Where each model's data comes from: the one place that tells the three kinds of model apart.

- `tiny` (no directory): random tokens and images, seeded; no evaluation.
- the shipped toy: its own task's proxy data, calibration samples and test split
  (`ellava_jax.toy.defaults`), unless the user names files.
- any other model: the files the user names (`--proxy`, `proxy_text`, `proxy_multimodal`,
  `--calibration`, `--data` / `eval_data`).
- any model with a tokenizer: the Bible (`--proxy bible`, `proxy_text: bible`: Old Testament
  segments; `ellava eval --heldout bible`: New Testament windows), `ellava_jax/data/bible.py`.

The library takes what this module hands it; it never imports the toy.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.data import bible
from ellava_jax.data import prompt as T
from ellava_jax.data.segments import read_proxy_text
from ellava_jax.errors import UserError
from ellava_jax.eval import harness
from ellava_jax.search.proxy_sources import ProxyData, file_proxy, no_images, random_proxy
from ellava_jax.tokens.fit import Calibration, file_calibration, random_calibration
from ellava_jax.toy import defaults as toy
from ellava_jax.toy.scenes import IMAGE_SIZE as TOY_IMAGE_SIZE


def is_toy(model_dir: str | None) -> bool:
    return model_dir is not None and os.path.realpath(model_dir) == os.path.realpath(
        toy.model_dir()
    )


def proxy_data(
    config: LlavaConfig,
    model_dir: str | None,
    *,
    text_file: str | None,
    n_text: int,
    seq_len: int,
    n_mm: int,
    seed: int = 0,
    mm_file: str | None = None,
    image_root: str | None = None,
    text_flag: str = "proxy_text",
    seq_flag: str = "proxy_seq_len",
) -> ProxyData:
    """Proxy text segments and image + text samples for calibration and the search.

    Args:
      text_file / mm_file: the user's files (`text_flag`, `seq_flag` name settings in messages).
      n_text, seq_len: text segments and their length; n_mm: image + text samples (none
        for a text-only LLaMA, whatever n_mm asks: `random_proxy` and `file_proxy` see to it).
    """
    context = config.text.max_position_embeddings
    if seq_len > context:
        raise UserError(f"{seq_flag}={seq_len}: more than the model's context of {context}")
    if model_dir is None:
        for flag, f in ((text_flag, text_file), ("proxy_multimodal", mm_file)):
            if f:
                raise UserError(
                    f"{flag}={f!r}: a random preset ('tiny', 'tiny-llama') has no tokenizer and "
                    f"draws random proxy samples; remove {flag} or use 'toy', 'smollm2' or an "
                    "HF directory"
                )
        return random_proxy(config, n_text, seq_len, n_mm, seed)
    if is_toy(model_dir) and not text_file:
        ids, mask = toy.text_segments(n_text, seq_len, seed)
        images = toy.multimodal(config, n_mm, seed) if n_mm else no_images(config)
        return ProxyData(ids, mask, *images)
    if not text_file:
        raise UserError(
            f"{model_dir}: set {text_flag} (a local text file such as PTB, or {bible.NAME}) to "
            "calibrate this model"
        )
    text_segments = None
    if text_file == bible.NAME:  # the Old Testament, tokenised with the model's tokenizer
        bible.data_files()  # not installed: one line, before the tokenizer loads
        text_segments = functools.partial(
            bible.proxy_segments, n=n_text, seq_len=seq_len, seed=seed
        )
    return file_proxy(
        config,
        model_dir,
        text_file,
        n_text,
        seq_len,
        seed,
        mm_file,
        n_mm,
        image_root,
        text_segments=text_segments,
    )


def search_proxy(settings, config: LlavaConfig, model_dir: str | None) -> ProxyData:
    """The search's proxy samples, as its settings name them."""
    return proxy_data(
        config,
        model_dir,
        text_file=settings.proxy_text,
        n_text=settings.proxy_segments,
        seq_len=settings.proxy_seq_len,
        n_mm=settings.proxy_multimodal_samples,
        seed=settings.seed,
        mm_file=settings.proxy_multimodal,
        image_root=settings.image_root,
    )


def prune_calibration(
    config: LlavaConfig, model_dir: str | None, proxy: str | None, n: int, seq_len: int, seed: int
) -> list:
    """`ellava prune`'s calibration batches: the `--proxy` file's text, random tokens for
    `tiny`, or the toy's own text plus n // 2 image + description samples."""
    n_mm = n // 2 if is_toy(model_dir) and not proxy else 0
    data = proxy_data(
        config,
        model_dir,
        text_file=proxy,
        n_text=n,
        seq_len=seq_len,
        n_mm=n_mm,
        seed=seed,
        text_flag="--proxy",
        seq_flag="--seqlen",
    )
    return data.calibration_batches()


def fitprune_calibration(
    config: LlavaConfig,
    model_dir: str | None,
    n: int,
    seed: int = 0,
    path: str | None = None,
    image_root: str | None = None,
) -> Calibration:
    """FitPrune's calibration batch (never an evaluation split): the jsonl `path` of image +
    text rows when given; else random prompts for `tiny`, and the toy task's image +
    description samples for a model of the toy's image size; any other model needs `path`.
    `image_root`: the folder the file's images may come from (default: the file's own)."""
    if path is not None:
        if model_dir is None:
            raise UserError(
                f"{path}: a calibration file needs a model directory with a tokenizer "
                "('tiny' has none)"
            )
        return file_calibration(config, model_dir, path, n, image_root)
    if model_dir is None:
        return random_calibration(config, n, seed)
    if config.vision.image_size != TOY_IMAGE_SIZE:
        raise UserError(
            f"{model_dir}: pass a calibration file (jsonl rows with 'image' and 'text') for "
            "this model; the built-in proxy samples are the toy task's"
        )
    ids, mask, pix = toy.multimodal(config, n, seed)
    return Calibration(ids, mask, np.asarray(pix, np.float32))


def eval_records(data: str | None, limit: int | None = None, image_root: str | None = None):
    """(records, jsonl path): a jsonl file, or the toy's test split when `data` is None / 'toy'."""
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit}: evaluate at least 1 record")
    if data in (None, "toy", "toy-test"):
        return toy.test_records(limit), None
    return harness.load_eval_records(data, limit, image_root)


def heldout_windows(config: LlavaConfig, model_dir: str, heldout: str, seq_len: int):
    """(ids, mask, info) of held-out text for `ellava eval --heldout`, tokenised with the model's
    tokenizer: `bible`, the fixed New Testament windows (`data/bible.heldout_windows`: 128 x 256
    tokens at seq_len 256), or a text / jsonl file, every whole window of seq_len from its start.
    `info` names the source and counts windows and tokens."""
    from transformers import AutoTokenizer  # here, not at the top: it takes seconds to import

    context = config.text.max_position_embeddings
    if not 2 <= seq_len <= context:
        raise UserError(f"--seq-len={seq_len}: must be in [2, {context}] (the model's context)")
    if heldout == bible.NAME:
        bible.data_files()  # not installed: one line, before the tokenizer loads
        ids, mask = bible.heldout_windows(AutoTokenizer.from_pretrained(model_dir), seq_len)
        info = {"source": bible.NAME, "books": list(bible.DEFAULT_HELDOUT_BOOKS)}
    else:
        text = read_proxy_text(heldout)
        stream = bible.encode(AutoTokenizer.from_pretrained(model_dir), text)
        if stream.size < seq_len:
            raise UserError(
                f"{heldout}: {stream.size} tokens, fewer than one window of --seq-len {seq_len}"
            )
        ids, mask = bible.consecutive_windows(stream, seq_len)
        info = {"source": heldout}
    n = len(ids)
    info |= {"windows": n, "seq_len": seq_len, "tokens": n * seq_len}
    info["predicted_tokens"] = n * (seq_len - 1)  # what the perplexity averages over
    return ids, mask, info


def toy_perplexity(config: LlavaConfig, params, tok) -> float:
    """Perplexity on the toy's held-out proxy text."""
    ids, mask = toy.perplexity_segments(tok)
    return harness.perplexity(config, params, ids, mask)


def default_evaluator(settings, model_dir: str | None):
    """An `evaluate(config, params) -> result` for a search's model, or None if it has no data.

    The toy is evaluated on its test split; a user model on `settings.eval_data`.
    """
    if model_dir is None or (settings.eval_data is None and not is_toy(model_dir)):
        return None
    tok = T.load_tokenizer(model_dir)
    records, path = eval_records(settings.eval_data, settings.eval_limit, settings.image_root)
    # refused now, not after the search: prompts the model cannot hold
    harness.check_prompt_lengths(LlavaConfig.from_hf_config(model_dir), tok, records, path)

    def evaluate(config, params):
        return harness.evaluate_records(
            config,
            params,
            tok,
            records,
            jsonl_path=path,
            model_dir=model_dir,
            image_root=settings.image_root,
        )

    return evaluate

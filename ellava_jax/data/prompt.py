"""The LLaVA-1.5 multiple-choice prompt, and token ids for records, captions and text.

The prompt follows LLaVA-1.5's ScienceQA evaluation:

    USER: <image>\\nContext: {context}\\n{question}\\nA. {a}\\nB. {b}\\n
    Answer with the option's letter from the given choices directly. ASSISTANT: {letter}</s>

(the image line only when there is an image, the context line only when there is context).
As HF `LlavaProcessor` does, the one `<image>` is expanded to one placeholder per visual token
before tokenizing, and the model puts the projected image features at those positions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tokenizers import Tokenizer

from ellava_jax.data.records import LETTERS, Record
from ellava_jax.errors import UserError

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)  # ids 0..4, in this order
INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_REQUEST = "Describe the picture."
MODEL_MAX_LENGTH = 512


def format_prompt(record: Record, image_token: str = IMAGE) -> str:
    """The LLaVA-1.5 multiple-choice prompt of a record, ending in 'ASSISTANT:'."""
    lines = []
    if record.context:
        lines.append(f"Context: {record.context}")
    lines.append(record.question)
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(record.choices)]
    lines.append(INSTRUCTION)
    body = "\n".join(lines)
    image = f"{image_token}\n" if record.has_image else ""
    return f"USER: {image}{body} ASSISTANT:"


def format_answer(record: Record) -> str:
    """The assistant's reply: a space and the answer letter."""
    return f" {record.answer_letter}"


def expand_image_tokens(text: str, num_image_tokens: int, image_token: str = IMAGE) -> str:
    """Each image token -> num_image_tokens of them (as HF LlavaProcessor)."""
    return text.replace(image_token, image_token * num_image_tokens)


def _backend(tok):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (or the object itself)."""
    return getattr(tok, "backend_tokenizer", tok)


def encode_text(tok, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of text; a bos in front when add_bos (whatever the post-processor does)."""
    ids = _backend(tok).encode(text, add_special_tokens=False).ids
    if add_bos:
        ids = [token_id(tok, BOS), *ids]
    return ids


def token_id(tok, token: str) -> int:
    i = _backend(tok).token_to_id(token)
    if i is None:
        raise KeyError(f"token {token!r} is not in the vocabulary")
    return i


def encode_record(
    tok, record: Record, num_image_tokens: int, with_answer: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a record's prompt (and answer), image placeholder expanded.

    Args:
        tok: a `tokenizers.Tokenizer` or a transformers tokenizer.
        record: the multiple-choice record.
        num_image_tokens: visual tokens per image (64 for the toy).
        with_answer: append the answer letter and eos (for training).

    Returns:
        (ids, target_mask): target_mask is 1 on the answer letter and eos, 0 elsewhere.
    """
    prompt = expand_image_tokens(format_prompt(record), num_image_tokens)
    ids = encode_text(tok, prompt)
    mask = [0] * len(ids)
    if with_answer:
        ans = _answer_ids(tok, record)
        ids, mask = ids + ans, mask + [1] * len(ans)
    return ids, mask


def _answer_ids(tok, record: Record) -> list[int]:
    """The reply's tokens: the answer letter and eos."""
    return encode_text(tok, format_answer(record), add_bos=False) + [token_id(tok, EOS)]


def encode_followup(tok, record: Record) -> tuple[list[int], list[int]]:
    """A further turn about the same image, as LLaVA's multi-turn training rows hold them.

    "USER: {question and options} ASSISTANT: {letter}</s>" (no image line, no bos), to be
    appended to a row that `encode_record(..., with_answer=True)` began. Target mask as there.
    """
    text = format_prompt(dataclasses.replace(record, image=None, pixels=None))
    ids = encode_text(tok, text, add_bos=False)
    ans = _answer_ids(tok, record)
    return ids + ans, [0] * len(ids) + [1] * len(ans)


def encode_caption(tok, text: str, num_image_tokens: int) -> tuple[list[int], list[int]]:
    """An image + description sample as a LLaVA turn; the target mask covers the description.

    "USER: <image>\\nDescribe the picture. ASSISTANT: {text}</s>", image placeholder expanded.
    """
    prompt = expand_image_tokens(f"USER: {IMAGE}\n{CAPTION_REQUEST} ASSISTANT:", num_image_tokens)
    ids = encode_text(tok, prompt)
    reply = encode_text(tok, " " + text, add_bos=False) + [token_id(tok, EOS)]
    return ids + reply, [0] * len(ids) + [1] * len(reply)


def letter_ids(tok, n: int = len(LETTERS)) -> list[int]:
    """Ids of the answer letters as the assistant writes them (' A', ' B', ...)."""
    out = []
    for letter in LETTERS[:n]:
        ids = encode_text(tok, f" {letter}", add_bos=False)
        if len(ids) != 1:
            raise UserError(
                f"this tokenizer writes the answer letter ' {letter}' as {len(ids)} tokens "
                f"{ids}: multiple-choice scoring needs one token per letter (use --data none "
                "and held-out perplexity for this model)"
            )
        out.append(ids[0])
    return out


def load_tokenizer(model_dir: str | Path):
    """The raw `tokenizers.Tokenizer` of a model directory (fast; no transformers import)."""

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

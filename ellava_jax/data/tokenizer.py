"""The toy's tokenizer and the LLaVA-1.5 multiple-choice prompt.

The tokenizer is word-level over GPT-2 style byte-level pre-tokens (a word carries its leading
space, "Ġzib"), built with HF `tokenizers` from the closed vocabulary of the toy task and saved
as `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`, so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it as it loads a real LLaVA's. Decoding
is exact for in-vocabulary text; anything else becomes `<unk>`.

The prompt follows LLaVA-1.5's ScienceQA evaluation:

    USER: <image>\\nContext: {context}\\n{question}\\nA. {a}\\nB. {b}\\n
    Answer with the option's letter from the given choices directly. ASSISTANT: {letter}</s>

(the image line only when there is an image, the context line only when there is context).
As HF `LlavaProcessor` does, the one `<image>` is expanded to one placeholder per visual token
before tokenizing, and the model puts the projected image features at those positions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ellava_jax.data.records import LETTERS, Record

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
            raise ValueError(f"answer letter {letter!r} is not one token: {ids}")
        out.append(ids[0])
    return out


def build_tokenizer(corpus: list[str]):
    """A word-level `tokenizers.Tokenizer` whose vocabulary is every pre-token of corpus.

    Returns:
        tokenizers.Tokenizer with specials <unk>, <s>, </s>, <pad>, <image> at ids 0..4.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: set[str] = set()
    # the prompt's fixed parts, with every letter in both positions it takes
    extra = [f"USER: {IMAGE}\nContext: {INSTRUCTION} ASSISTANT:", f"{IMAGE}\n{CAPTION_REQUEST}"]
    extra += [f"\n{c}. {c}" for c in LETTERS]
    for text in [*corpus, *extra]:
        for part in text.split(IMAGE):  # specials are matched before pre-tokenizing
            # a sentence can also follow another one: its first word then has a space
            for variant in (part, " " + part):
                words.update(w for w, _ in pre.pre_tokenize_str(variant))
    words -= set(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "extra_special_tokens": {"image_token": IMAGE},
        "padding_side": "left",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {**specials, "additional_special_tokens": [IMAGE]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path):
    """The raw `tokenizers.Tokenizer` of a model directory (fast; no transformers import)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def build_toy_tokenizer():
    """The toy task's tokenizer, from the task's own text (deterministic)."""
    from ellava_jax.data.proxy import corpus_for_vocabulary
    from ellava_jax.data.questions import generate_split

    corpus = corpus_for_vocabulary()
    for split, n in (("train", 4000), ("validation", None), ("test", None)):
        for rec, _ in generate_split(split, n):
            corpus.append(format_prompt(rec) + format_answer(rec))
            # the same prompt as a follow-up turn (no image line), as training rows hold it
            corpus.append(format_prompt(dataclasses.replace(rec, image=None, pixels=None)))
    return build_tokenizer(corpus)

"""The toy's tokenizer: word-level over GPT-2 style byte-level pre-tokens.

A word carries its leading space ("Ġzib"). It is built with HF `tokenizers` from the closed
vocabulary of the toy task and saved as `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json`, so that `transformers.AutoTokenizer.from_pretrained(dir)` loads it as
it loads a real LLaVA's. Decoding is exact for in-vocabulary text; anything else becomes `<unk>`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ellava_jax.data.prompt import (
    BOS,
    CAPTION_REQUEST,
    EOS,
    IMAGE,
    INSTRUCTION,
    MODEL_MAX_LENGTH,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    format_answer,
    format_prompt,
)
from ellava_jax.data.records import LETTERS
from ellava_jax.toy.questions import generate_split
from ellava_jax.toy.stream import corpus_for_vocabulary


def build_tokenizer(corpus: list[str]):
    """A word-level `tokenizers.Tokenizer` whose vocabulary is every pre-token of corpus.

    Returns:
        tokenizers.Tokenizer with specials <unk>, <s>, </s>, <pad>, <image> at ids 0..4.
    """

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


def build_toy_tokenizer():
    """The toy task's tokenizer, from the task's own text (deterministic)."""

    corpus = corpus_for_vocabulary()
    for split, n in (("train", 4000), ("validation", None), ("test", None)):
        for rec, _ in generate_split(split, n):
            corpus.append(format_prompt(rec) + format_answer(rec))
            # the same prompt as a follow-up turn (no image line), as training rows hold it
            corpus.append(format_prompt(dataclasses.replace(rec, image=None, pixels=None)))
    return build_tokenizer(corpus)

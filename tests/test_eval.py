"""The evaluation harness: prompt, scoring and per-category accounting, checked against a model
whose answer is known in advance."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from ellava_jax.data import prompt as T
from ellava_jax.data.records import write_records
from ellava_jax.eval.harness import evaluate_records, perplexity
from ellava_jax.model import init_params
from ellava_jax.toy import tokenizer as toy_tokenizer
from ellava_jax.toy.questions import generate_split
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def toy_tok():
    return toy_tokenizer.build_toy_tokenizer()


@pytest.fixture(scope="module")
def setup(toy_tok):
    config = tiny_config(
        text_vocab_size=toy_tok.get_vocab_size(),
        image_token_index=T.token_id(toy_tok, T.IMAGE),
        vision_image_size=32,
        vision_patch_size=4,
    )
    params = init_params(config, jax.random.key(0))
    records = [r for r, _ in generate_split("validation", 60)]
    return config, params, records


def _fixed_logits(tok, order):
    """A stand-in model whose next-token logits rank the letters in `order` (first = best)."""
    letters = T.letter_ids(tok)

    def logits_fn(config, params, ids, pix, mask):
        lg = np.zeros((ids.shape[0], config.text.vocab_size), np.float32)
        for rank, letter in enumerate(order):
            lg[:, letters["ABCDE".index(letter)]] = 10.0 - rank
        return lg

    return logits_fn


@pytest.mark.parametrize("scoring", ["generate", "likelihood"])
def test_scoring_and_accounting_against_known_answers(setup, toy_tok, scoring):
    config, params, records = setup
    # ' E' is the model's favourite token; among a record's own options, 'B' ranks first.
    fn = _fixed_logits(toy_tok, "EBACD")
    res = evaluate_records(
        config,
        params,
        toy_tok,
        records,
        scoring=scoring,
        batch_size=16,
        progress=False,
        logits_fn=fn,
    )
    if scoring == "generate":  # the greedy token ' E' is a valid answer only with 5 options
        expect = [len(r.choices) == 5 and r.answer == 4 for r in records]
    else:
        expect = [r.answer == (4 if len(r.choices) == 5 else 1) for r in records]
    assert res["n"] == len(records) == sum(res["per_category_n"].values())
    assert res["correct"] == sum(expect)
    for cat in {r.category for r in records}:
        sel = [e for e, r in zip(expect, records) if r.category == cat]
        assert res["per_category"][cat] == pytest.approx(sum(sel) / len(sel))


def test_jsonl_with_image_files_scores_like_in_memory(setup, toy_tok, tmp_path):
    config, params, records = setup
    from ellava_jax.data.records import load_records, save_image

    (tmp_path / "img").mkdir()
    out = []
    for i, r in enumerate(records[:20]):
        d = r.to_json()
        if r.pixels is not None:
            save_image(tmp_path / "img" / f"{i}.png", r.pixels)
            d["image"] = f"img/{i}.png"
        out.append(d)
    write_records(tmp_path / "q.jsonl", out)
    disk = load_records(tmp_path / "q.jsonl")
    a = evaluate_records(config, params, toy_tok, records[:20], progress=False, batch_size=8)
    b = evaluate_records(
        config,
        params,
        toy_tok,
        disk,
        jsonl_path=str(tmp_path / "q.jsonl"),
        progress=False,
        batch_size=8,
    )
    assert a["correct"] == b["correct"] and a["per_category"] == b["per_category"]


def test_perplexity_of_a_uniform_model_is_the_vocab_size(setup):
    config, params, _ = setup
    p = dict(params, lm_head={"kernel": np.zeros(params["lm_head"]["kernel"].shape, np.float32)})
    ids = np.random.default_rng(0).integers(5, 200, (3, 20))
    assert perplexity(config, p, ids, np.ones_like(ids)) == pytest.approx(
        config.text.vocab_size, rel=1e-4
    )


def test_bad_jsonl_line_names_file_line_and_key(tmp_path):
    from ellava_jax.data.records import RecordError, load_records

    p = tmp_path / "bad.jsonl"
    p.write_text(
        json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5, "category": "x"}) + "\n"
    )
    with pytest.raises(RecordError, match=r"bad\.jsonl:1.*answer"):
        load_records(p)

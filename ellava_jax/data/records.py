"""Multiple-choice records: the jsonl format the evaluation harness reads (ScienceQA-compatible).

One JSON object per line:

    question  str        required
    choices   list[str]  required, 2-5 non-empty strings
    answer    int        required, index into choices
    category  str        required (per-category accuracy is reported on it)
    image     str        optional, path of an image file relative to the jsonl's directory
    context   str        optional, text context shown before the question (ScienceQA's hint)
    subject   str        optional

Unknown keys are an error, so a typo in a field name does not silently drop a field.
In memory a record can also carry its image as a uint8 array (`pixels`), which the synthetic
task uses for training without touching the disk, and the grid cells its answer depends on
(`focus`, synthetic records only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ellava_jax.errors import UserError
from ellava_jax.inputs import jsonl_objects, read_image

MIN_CHOICES, MAX_CHOICES = 2, 5
LETTERS = "ABCDE"

_REQUIRED = {"question": str, "choices": list, "answer": int, "category": str}
_OPTIONAL = {"image": str, "context": str, "subject": str}


class RecordError(UserError):
    """A malformed record; the message names the file, the line and the key."""


@dataclass
class Record:
    question: str
    choices: list[str]
    answer: int
    category: str
    image: str | None = None  # path, relative to the jsonl's directory
    context: str | None = None
    subject: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)  # uint8 [S, S, 3]
    # Synthetic records only, never in jsonl: the grid cells whose objects the answer depends
    # on (`questions`); training can teach the decoder to look there (`toy.train`).
    # Per focus head (`questions.FOCUS_HEADS`) the cells it should read, and the question's
    # words that name them.
    focus: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False, compare=False)
    refs: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    # The 1-based line of the jsonl file the record was read from (`load_records`), for errors.
    line: int | None = field(default=None, repr=False, compare=False)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.pixels is not None

    def to_json(self) -> dict:
        """The jsonl object (without pixels; write the image to a file and set `image`)."""
        out = {
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
            "category": self.category,
        }
        for k in _OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


def validate(obj, where: str = "record") -> Record:
    """Checks one decoded jsonl object; raises RecordError naming `where` and the key."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in _REQUIRED.items():
        if key not in obj:
            raise RecordError(f"{where}: missing required key {key!r}")
        v = obj[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise RecordError(
                f"{where}: key {key!r} must be {typ.__name__}, got {type(v).__name__}"
            )
    for key, typ in _OPTIONAL.items():
        if key in obj and obj[key] is not None and not isinstance(obj[key], typ):
            raise RecordError(
                f"{where}: key {key!r} must be {typ.__name__}, got {type(obj[key]).__name__}"
            )
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise RecordError(f"{where}: unknown key {unknown[0]!r}")
    choices = obj["choices"]
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise RecordError(
            f"{where}: key 'choices' must hold {MIN_CHOICES}-{MAX_CHOICES} options, "
            f"got {len(choices)}"
        )
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise RecordError(f"{where}: key 'choices' must hold non-empty strings")
    if not 0 <= obj["answer"] < len(choices):
        raise RecordError(
            f"{where}: key 'answer' is {obj['answer']}, outside 0..{len(choices) - 1}"
        )
    if not obj["question"].strip():
        raise RecordError(f"{where}: key 'question' is empty")
    return Record(**{k: obj.get(k) for k in (*_REQUIRED, *_OPTIONAL)})


def load_records(path: str | Path) -> list[Record]:
    """Reads and validates a jsonl file. Image paths stay relative; see `image_path`.

    Raises:
        RecordError: on the first bad line, naming the file, the line number (1-based) and key.
    """

    out = []
    for n, where, obj in jsonl_objects(path, "jsonl file", RecordError):
        rec = validate(obj, where)
        rec.line = n
        out.append(rec)
    return out


def image_path(jsonl_path: str | Path, record: Record) -> Path | None:
    """Absolute path of a record's image (relative paths resolve against the jsonl's dir)."""
    if record.image is None:
        return None
    p = Path(record.image)
    return p if p.is_absolute() else Path(jsonl_path).parent / p


def load_image(path: str | Path, where: str | None = None) -> np.ndarray:
    """An image file as uint8 [H, W, 3]; a file that is not an image is a `UserError` naming
    it (and `where`, e.g. the jsonl line that points at it)."""

    return read_image(path, where)


def save_image(path: str | Path, pixels: np.ndarray) -> None:

    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB").save(path)


def write_records(path: str | Path, records) -> None:
    """Writes records as jsonl (validating each; pixels are not written, use `image`)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(records, start=1):
            obj = r.to_json() if isinstance(r, Record) else r
            validate(obj, f"{path}:{i}")
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")

"""Fixed-shape numpy batches of the toy task for training and scoring.

A batch is `input_ids`, `attention_mask` and `target_mask` [B, T] (left padded, as the toy
tokenizer pads) plus `pixel_values` [B_img, 3, S, S] for the rows that hold an image: the first
B_img rows hold one image each and the rest none, so one jit compilation serves every batch.
Rows are of four kinds: image questions, image descriptions (captions), text-only questions
and packed text-stream rows (facts and descriptions, loss on every token).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ellava_jax.data import prompt as T
from ellava_jax.data.images import pixel_values
from ellava_jax.data.records import Record
from ellava_jax.toy import questions, scenes
from ellava_jax.toy import stream as proxy


def pad_left(
    rows: list[tuple[list[int], list[int]]], length: int, pad_id: int, cut: bool = False
) -> dict:
    """(ids, target_mask) rows -> int32 arrays [B, length], left padded.

    A row longer than length is an error, or with cut=True loses its end (never its image
    placeholders, which come first: a training caption may lose its last sentences).
    """
    b = len(rows)
    ids = np.full((b, length), pad_id, np.int32)
    attn = np.zeros((b, length), np.int32)
    tgt = np.zeros((b, length), np.int32)
    for i, (r, m) in enumerate(rows):
        if len(r) > length and not cut:
            raise ValueError(f"row {i} has {len(r)} tokens, more than {length}")
        r, m = r[:length], m[:length]
        n = len(r)
        ids[i, length - n :] = r
        attn[i, length - n :] = 1
        tgt[i, length - n :] = m
    return {"input_ids": ids, "attention_mask": attn, "target_mask": tgt}


def record_rows(tok, records: list[Record], num_image_tokens: int, with_answer: bool):
    return [T.encode_record(tok, r, num_image_tokens, with_answer) for r in records]


def eval_batches(
    tok, records: list[Record], num_image_tokens: int, batch_size: int, length: int
) -> Iterator[dict]:
    """Prompt-only batches of records with images (pixels in memory), in order.

    Yields dicts with input_ids, attention_mask [B, length], pixel_values [B, 3, S, S],
    answers [B] and n (rows that are real; the last batch is padded with copies).
    """
    pad = T.token_id(tok, T.PAD)
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)
        if not all(r.pixels is not None for r in chunk):
            raise ValueError("eval_batches needs records with pixels")
        out = pad_left(record_rows(tok, chunk, num_image_tokens, False), length, pad)
        out["pixel_values"] = pixel_values(np.stack([r.pixels for r in chunk]))
        out["answers"] = np.asarray([r.answer for r in chunk], np.int32)
        out["n"] = n
        yield out


MAX_REF_TOKENS = 3  # tokens of a focus head's referring words (`Record.refs`) a batch keeps


def _last_occurrence(seq: list[int], sub: list[int], start: int, stop: int) -> int:
    """Index of the last occurrence of sub in seq[start:stop], or -1."""
    for i in range(stop - len(sub), start - 1, -1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


class TrainStream:
    """Endless deterministic training batches mixing the four row kinds.

    Args:
        tok: the toy tokenizer.
        num_image_tokens: visual tokens per image.
        n_image_rows: rows with an image per batch (questions and captions).
        n_text_rows: rows without (text-only questions and text-stream rows).
        length: tokens per row.
        seed: stream seed.
        p_caption: share of image rows that are captions rather than questions.
        p_stream: share of text rows that are text-stream rows rather than questions.
        turns: image-question rows hold up to this many question turns about their image
            (LLaVA's multi-turn rows): more answers learned per visual token computed.
        min_objects: fewest objects in a question's scene (captions keep the natural mix).
        categories: image-question categories to draw (all but recall by default), at their
            CATEGORY_WEIGHTS, for the first question of a row and its follow-ups.
        boost: per category, a factor on its training weight (the splits keep
            CATEGORY_WEIGHTS): more practice where the model is weakest.
        kind_weights: loss weight of each row kind (question, caption, stream). A kind's
            target tokens share its weight equally, so that a 160-token text row does not
            outweigh a question's one-letter answer a hundredfold.

    Batches also hold `loss_weight` float32 [B, T]: the weight of predicting each token, to
    be summed (not averaged) with the per-token negative log-likelihood; `focus` float32
    [B, T, F, 4] (F = `questions.FOCUS_HEADS`): at the position that predicts an image
    question's answer letter, per focus head 1 for each grid cell it should read
    (`Record.focus`), 0 elsewhere; and `refs` int32 [B, T, F, MAX_REF_TOKENS]: at the
    same positions (text-only questions too), per focus head the row positions of the
    question's words that name what it reads (`Record.refs`), -1 for none; and
    `answer_class` int32 [B, T]: at those positions the answer's `questions.answer_class`,
    -1 elsewhere.
    """

    def __init__(
        self,
        tok,
        num_image_tokens: int,
        n_image_rows: int,
        n_text_rows: int,
        length: int,
        seed: int = 0,
        p_caption: float = 0.2,
        p_stream: float = 0.5,
        kind_weights: tuple[float, float, float] = (1.0, 0.5, 1.0),
        turns: int = 1,
        min_objects: int = 1,
        categories: list[str] | None = None,
        boost: dict[str, float] | None = None,
    ):
        self.tok, self.n_img_tok, self.length = tok, num_image_tokens, length
        self.n_image_rows, self.n_text_rows = n_image_rows, n_text_rows
        self.p_caption, self.p_stream = p_caption, p_stream
        self.kind_weights = kind_weights
        self.turns = turns
        self.rng = np.random.default_rng([seed, 17])
        image_w = questions.image_weights()
        unknown = sorted((set(categories or ()) | set(boost or ())) - set(image_w))
        if unknown:
            raise ValueError(f"unknown image-question category {unknown[0]!r}")
        if categories is not None:
            image_w = {k: v for k, v in image_w.items() if k in categories}
        for k, factor in (boost or {}).items():
            if k in image_w:
                image_w[k] = image_w[k] * factor
        self.image_w = image_w
        self.image_q = questions.iter_records(
            "train", seed=seed, weights=image_w, min_objects=min_objects
        )
        self.text_q = questions.iter_records("train", seed=seed, weights={"recall": 1.0})
        self.captions = proxy.caption_stream("train", seed=seed)
        self.text = proxy.text_stream("train", seed=seed)
        self.pad = T.token_id(tok, T.PAD)
        self.bos = T.token_id(tok, T.BOS)
        self._carry: list[int] = []
        self._phrase_ids: dict[str, list[int]] = {}

    def _stream_row(self) -> tuple[list[int], list[int]]:
        """One row of packed sentences, <s> first, loss on every token after it."""
        ids = [self.bos]
        while len(ids) < self.length:
            if not self._carry:
                self._carry = T.encode_text(self.tok, " " + next(self.text), add_bos=False)
            take = self.length - len(ids)
            ids += self._carry[:take]
            self._carry = self._carry[take:]
        return ids, [0] + [1] * (len(ids) - 1)

    def __iter__(self):
        return self

    def _turn(self, ids: list[int], start: int, answer_at: int, r) -> tuple:
        """(position predicting r's answer letter, r.focus, per focus head the positions of the
        tokens naming its object: the last occurrence of r.refs[h] in ids[start:answer_at],
        r's `questions.answer_class`)."""
        refs = None
        if r.refs is not None:
            refs = []
            for phrase in r.refs:
                if phrase not in self._phrase_ids:
                    self._phrase_ids[phrase] = T.encode_text(self.tok, " " + phrase, add_bos=False)
                want = self._phrase_ids[phrase][:MAX_REF_TOKENS]
                at = _last_occurrence(ids, want, start, answer_at)
                if at < 0:
                    raise AssertionError(f"{phrase!r} is not in the question {r.question!r}")
                refs.append(list(range(at, at + len(want))))
        return answer_at, r.focus, refs, questions.answer_class(r)

    def __next__(self) -> dict:
        rows, pixels, kinds, cells = [], [], [], []  # kind: 0 question, 1 caption, 2 stream
        focus = []  # per row and turn: (position predicting the answer letter, cells, refs)
        for _ in range(self.n_image_rows):
            if self.rng.random() < self.p_caption:
                s = next(self.captions)
                rows.append(T.encode_caption(self.tok, s.text, self.n_img_tok))
                focus.append([])
                pixels.append(s.pixels)
                cells.append(scenes.cell_targets(s.scene))
                kinds.append(1)
            else:
                r, scene = next(self.image_q)
                ids, mask = T.encode_record(self.tok, r, self.n_img_tok, with_answer=True)
                turns = [self._turn(ids, 0, mask.index(1) - 1, r)]
                for r2 in questions.more_records(self.rng, scene, self.turns - 1, self.image_w):
                    i2, m2 = T.encode_followup(self.tok, r2)
                    if len(ids) + len(i2) > self.length:
                        break
                    start = len(ids)
                    ids, mask = ids + i2, mask + m2
                    turns.append(self._turn(ids, start, start + m2.index(1) - 1, r2))
                rows.append((ids, mask))
                focus.append(turns)
                pixels.append(r.pixels)
                cells.append(scenes.cell_targets(scene))
                kinds.append(0)
        for _ in range(self.n_text_rows):
            u = self.rng.random()
            if u < self.p_stream:
                rows.append(self._stream_row())
                focus.append([])
                kinds.append(2)
            else:
                r, _ = next(self.text_q)
                ids, mask = T.encode_record(self.tok, r, self.n_img_tok, with_answer=True)
                rows.append((ids, mask))
                focus.append([self._turn(ids, 0, mask.index(1) - 1, r)])
                kinds.append(0)
        out = pad_left(rows, self.length, self.pad, cut=True)
        heads = questions.FOCUS_HEADS
        out["focus"] = np.zeros((len(rows), self.length, heads, 4), np.float32)
        out["refs"] = np.full((len(rows), self.length, heads, MAX_REF_TOKENS), -1, np.int32)
        out["answer_class"] = np.full((len(rows), self.length), -1, np.int32)
        for i, ((ids, _), turns) in enumerate(zip(rows, focus)):
            if len(ids) > self.length:  # cut (only captions are ever this long)
                continue
            off = self.length - len(ids)
            for t, where, refs, answer in turns:
                out["answer_class"][i, off + t] = answer
                for h in range(heads):
                    if where is not None:
                        out["focus"][i, off + t, h, list(where[h])] = 1.0
                    if refs is not None:
                        out["refs"][i, off + t, h, : len(refs[h])] = [off + j for j in refs[h]]
        out["pixel_values"] = pixel_values(np.stack(pixels)) if pixels else None
        out["cell_targets"] = np.stack(cells) if cells else None  # [B_img, 4, 3]
        # weights of predicting token t+1 from position t: target_mask shifted left
        tgt = np.zeros_like(out["target_mask"], dtype=np.float32)
        tgt[:, :-1] = out["target_mask"][:, 1:]
        kinds = np.asarray(kinds)
        w = np.zeros_like(tgt)
        for k, kw in enumerate(self.kind_weights):
            sel = kinds == k
            total = tgt[sel].sum()
            if total > 0:
                w[sel] = tgt[sel] * (kw / total)
        out["loss_weight"] = w
        out["row_kind"] = kinds.astype(np.int32)
        return out

"""Where the answer position of a toy LLaVA looks: a diagnostic of visual routing.

    PYTHONPATH=. .venv/bin/python scripts/probe_toy_routing.py --model DIR [--n 40]

For validation questions that name a place ("What colour is the object in the top left?") on
scenes with four objects, prints per decoder layer and head the attention mass that the last
prompt position puts on the visual tokens, on the named cell's visual tokens (chance: a quarter
of the visual mass) and on the question's own words. A model that routes puts most of its
visual mass on the named cell in some layer, after some head has read the question.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from convert.hf import load_hf_llava
from ellava_jax.data import prompt as T
from ellava_jax.data.images import pixel_values
from ellava_jax.model.llama import (
    attention_mask_4d,
    layer_params,
    layer_with_attention,
    positions_from_mask,
    rope_cos_sin,
)
from ellava_jax.model.llava import embed_inputs
from ellava_jax.toy import batches, questions, scenes


def _named_cell(question: str) -> int | None:
    """The grid cell a question names ("the object in the top left"), or None."""
    for i, place in enumerate(scenes.POSITIONS):
        if f"object in the {place}" in question:
            return i
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF-format toy LLaVA directory")
    ap.add_argument("--n", type=int, default=40, help="questions to probe")
    args = ap.parse_args(argv)

    config, params = load_hf_llava(args.model)
    tok = T.load_tokenizer(args.model)
    picked = []
    for rec, scene in questions.generate_split("validation", 2000):
        if rec.has_image and len(scene.objects) == 4 and _named_cell(rec.question) is not None:
            picked.append(rec)
        if len(picked) == args.n:
            break
    rows = batches.record_rows(tok, picked, config.num_image_tokens, with_answer=False)
    length = max(len(r) for r, _ in rows)
    b = batches.pad_left(rows, length, T.token_id(tok, T.PAD))
    ids = b["input_ids"]
    px = pixel_values(np.stack([r.pixels for r in picked]))

    cells = scenes.patch_cells()
    img = ids == config.image_token_index  # [B, T]
    start = img.argmax(1)
    named = [_named_cell(r.question) for r in picked]
    question_mask = np.zeros_like(img)
    for j, r in enumerate(picked):  # the question's tokens: after the image, before the options
        q = T.encode_text(tok, "\n" + r.question, add_bos=False)
        row = ids[j].tolist()
        for s in range(len(row) - len(q) + 1):
            if row[s : s + len(q)] == q:
                question_mask[j, s : s + len(q)] = True
                break

    h = embed_inputs(config, params, ids, px)
    pos = positions_from_mask(b["attention_mask"])
    cos, sin = rope_cos_sin(pos, config.text.head_dim, config.text.rope_theta, h.dtype)
    mask = attention_mask_4d(jnp.asarray(b["attention_mask"]), length, 0)
    for layer in range(config.text.num_hidden_layers):
        weights = layer_params(params, layer)
        h, probs = layer_with_attention(config.text, weights, h, cos, sin, mask)
        probs = np.asarray(probs)
        last = probs[..., -1, :].reshape(len(picked), -1, length)  # [B, heads, T]
        cols = []
        for head in range(last.shape[1]):
            a = last[:, head]
            vis = a[img.astype(bool)].reshape(len(picked), -1).sum(1)
            cell = np.asarray(
                [
                    a[j, start[j] : start[j] + len(cells)][cells == named[j]].sum()
                    for j in range(len(picked))
                ]
            )
            words = (a * question_mask).sum(1)
            cols.append(f"vis {vis.mean():.2f} cell {cell.mean():.2f} question {words.mean():.2f}")
        print(f"layer {layer}: " + " | ".join(cols))


if __name__ == "__main__":
    main()

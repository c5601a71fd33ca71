"""The synthetic toy task, the record format and the toy tokenizer."""

import json
import re

import numpy as np
import pytest

from ellava_jax.data import prompt as T
from ellava_jax.data.images import CLIP_MEAN, CLIP_STD, pixel_values
from ellava_jax.data.records import Record, RecordError, load_image, load_records, write_records
from ellava_jax.toy import facts, questions, scenes
from ellava_jax.toy import stream as proxy
from ellava_jax.toy import tokenizer as toy_tokenizer


@pytest.fixture(scope="module")
def test_split():
    return questions.generate_split("test")


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer.build_toy_tokenizer()


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_scene_images_and_pixel_values():
    rng = np.random.default_rng(0)
    s = scenes.sample_scene(rng)
    img = scenes.render(s)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    px = pixel_values(img)
    assert px.shape == (1, 3, 32, 32) and px.dtype == np.float32
    expect = (img[5, 7, 1] / 255 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert px[0, 1, 5, 7] == pytest.approx(expect, rel=1e-5)
    assert scenes.num_visual_tokens() >= 64
    for o in s.objects:  # each object's colour is drawn at its centre
        cx, cy = o.centre()
        assert tuple(img[cy, cx]) == scenes.COLOURS[o.colour]


def test_determinism_by_seed():
    a = _take(questions.iter_records("train", seed=3), 50)
    b = _take(questions.iter_records("train", seed=3), 50)
    c = _take(questions.iter_records("train", seed=4), 50)
    assert [r.to_json() for r, _ in a] == [r.to_json() for r, _ in b]
    assert all(np.array_equal(x.pixels, y.pixels) for (x, _), (y, _) in zip(a, b) if x.has_image)
    assert [r.to_json() for r, _ in a] != [r.to_json() for r, _ in c]
    assert _take(proxy.text_stream("proxy"), 20) == _take(proxy.text_stream("proxy"), 20)
    assert facts.fact_base() == facts.fact_base.__wrapped__()


def test_splits_never_share_an_image(test_split):
    keys = {}
    keys["test"] = {s.key() for _, s in test_split if s is not None}
    keys["validation"] = {s.key() for _, s in questions.generate_split("validation") if s}
    keys["train"] = {s.key() for _, s in _take(questions.iter_records("train"), 3000) if s}
    keys["proxy"] = {s.scene.key() for s in proxy.multimodal_samples(500)}
    names = list(keys)
    for i, a in enumerate(names):
        assert keys[a], a
        for b in names[i + 1 :]:
            assert not keys[a] & keys[b], (a, b)
    for _, s in test_split:
        if s is not None:
            assert scenes.split_of(s) == "test"
    with pytest.raises(ValueError):
        proxy.multimodal_samples(1, split="test")


def test_test_split_size_and_categories(test_split):
    assert len(test_split) >= 1000
    cats = {r.category for r, _ in test_split}
    assert cats == set(questions.CATEGORY_WEIGHTS)
    for r, s in test_split:
        assert 2 <= len(r.choices) <= 5 and len(set(r.choices)) == len(r.choices)
        assert 0 <= r.answer < len(r.choices)
        assert (s is None) == (r.category == "recall") == (not r.has_image)
        assert (r.context is not None) == (r.category == "context")


def test_knowledge_answers_follow_the_fact_base(test_split):
    kinds = facts.creature_of_kind()
    names = {c.name for c in facts.fact_base()}
    assert len(names) == len(facts.fact_base())  # names are unique
    checked = 0
    for r, s in test_split:
        m = re.fullmatch(r"Where does the object in the (\w+ \w+) live\?", r.question)
        if m:
            o = next(o for o in s.objects if o.position == m.group(1))
            assert r.choices[r.answer] == kinds[o.kind].home
            checked += 1
        m = re.fullmatch(r"Where does the (\w+) live\?", r.question)
        if m and r.category == "recall":
            assert r.choices[r.answer] == facts.creature_by_name()[m.group(1)].home
            checked += 1
        if r.choices[0] in facts.RELATIONS["home"]:  # options: the whole space, fixed order
            assert r.choices == list(facts.RELATIONS["home"])
    assert checked > 20


def test_proxy_text_is_not_questions():
    text = " ".join(proxy.proxy_text_segments(20))
    assert "?" not in text and "Answer" not in text
    for s in proxy.multimodal_samples(5):
        assert s.pixels.shape == (32, 32, 3)
        assert proxy.describe(s.scene).split(".")[0] in s.text


def test_write_split_round_trip(tmp_path):
    path = questions.write_split(tmp_path, "validation", n=30)
    recs = load_records(path)
    assert len(recs) == 30
    want = questions.generate_split("validation", 30)
    for r, (w, _) in zip(recs, want):
        assert r.to_json() == {**w.to_json(), **({"image": r.image} if w.has_image else {})}
        if w.has_image:
            assert np.array_equal(load_image(tmp_path / r.image), w.pixels)
    write_records(tmp_path / "again.jsonl", recs)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()


@pytest.mark.parametrize(
    "obj, key",
    [
        ({"choices": ["a", "b"], "answer": 0, "category": "c"}, "question"),
        ({"question": "q", "choices": "ab", "answer": 0, "category": "c"}, "choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2, "category": "c"}, "answer"),
        ({"question": "q", "choices": ["a"], "answer": 0, "category": "c"}, "choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": True, "category": "c"}, "answer"),
        ({"question": "q", "choices": ["a", "b"], "answer": 0, "category": "c", "img": "x"}, "img"),
        (
            {"question": "q", "choices": ["a", "b"], "answer": 0, "category": "c", "image": 3},
            "image",
        ),
    ],
)
def test_bad_line_names_file_line_and_key(tmp_path, obj, key):
    good = {"question": "q", "choices": ["a", "b"], "answer": 1, "category": "c"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(obj) + "\n")
    with pytest.raises(RecordError) as e:
        load_records(path)
    msg = str(e.value)
    assert f"{path}:3" in msg and repr(key) in msg


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": \n')
    with pytest.raises(RecordError, match=re.escape(f"{path}:1")):
        load_records(path)


def test_tokenizer_covers_the_task(tok, test_split):
    assert 150 <= tok.get_vocab_size() <= 2000
    assert [tok.token_to_id(t) for t in T.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for r, _ in test_split:
        ids, _ = T.encode_record(tok, r, 64, with_answer=True)
        assert tok.token_to_id(T.UNK) not in ids, r
    for text in proxy.proxy_text_segments(50):
        assert tok.token_to_id(T.UNK) not in tok.encode(text).ids
    # invented names never collide with a word of the templates
    plain = [
        r.question + " " + (r.context or "") for r, _ in test_split if r.subject != "knowledge"
    ]
    plain += [T.INSTRUCTION, proxy.describe(test_split[0][1] or test_split[1][1])]
    template_words = set(re.findall(r"[a-z]+", " ".join(plain).lower()))
    assert not template_words & {c.name for c in facts.fact_base()}


def test_tokenizer_loads_with_transformers_and_round_trips(tok, tmp_path, test_split):
    transformers = pytest.importorskip("transformers")
    toy_tokenizer.save_tokenizer(tok, tmp_path)
    at = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert at.padding_side == "left"
    assert (at.bos_token, at.eos_token, at.pad_token, at.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert at.convert_tokens_to_ids("<image>") == 4
    rec = test_split[0][0]
    text = T.format_prompt(rec) + T.format_answer(rec)
    ids = at(text)["input_ids"]
    assert ids == tok.encode(text).ids == T.encode_text(tok, text)
    assert ids[0] == at.bos_token_id
    assert at.decode(ids[1:]) == text
    batch = at(["The peg eats fish.", "What colour is the circle?"], padding=True)
    assert batch["input_ids"][0][0] == at.pad_token_id  # left padding
    assert T.encode_text(at, text) == ids


def test_prompt_format_and_image_placeholders(tok):
    rec = Record("What colour is the circle?", ["red", "blue"], 1, "colour", context="Ann owns it.")
    rec.pixels = np.zeros((32, 32, 3), np.uint8)
    assert T.format_prompt(rec) == (
        "USER: <image>\nContext: Ann owns it.\nWhat colour is the circle?\nA. red\nB. blue\n"
        "Answer with the option's letter from the given choices directly. ASSISTANT:"
    )
    assert T.format_answer(rec) == " B"
    ids, mask = T.encode_record(tok, rec, 64, with_answer=True)
    assert ids.count(T.token_id(tok, T.IMAGE)) == 64
    first = ids.index(4)
    assert ids[first : first + 64] == [4] * 64
    assert ids[-2:] == [T.letter_ids(tok)[1], T.token_id(tok, T.EOS)]
    assert mask == [0] * (len(ids) - 2) + [1, 1]
    text_only = Record("Where does the peg live?", ["north", "forest"], 1, "recall")
    ids, _ = T.encode_record(tok, text_only, 64)
    assert T.token_id(tok, T.IMAGE) not in ids
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>USER: Where")
    assert len(set(T.letter_ids(tok))) == 5


def test_train_stream_batches(tok):
    from ellava_jax.toy.batches import TrainStream

    st = TrainStream(tok, 64, n_image_rows=6, n_text_rows=4, length=160, seed=1, p_caption=0.5)
    a, b = next(st), next(TrainStream(tok, 64, 6, 4, 160, seed=1, p_caption=0.5))
    for _ in range(5):  # long captions are cut at their end, never in the image
        n_img = (next(st)["input_ids"] == T.token_id(tok, T.IMAGE)).sum(1)
        assert n_img.tolist() == [64] * 6 + [0] * 4
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape == a["loss_weight"].shape == (10, 160)
    assert a["pixel_values"].shape == (6, 3, 32, 32)
    n_img = (a["input_ids"] == T.token_id(tok, T.IMAGE)).sum(1)
    assert n_img[:6].tolist() == [64] * 6 and n_img[6:].tolist() == [0] * 4
    # each row kind present carries its weight in total; padding carries none
    assert a["loss_weight"].sum() <= 2.5 + 1e-4
    assert (a["loss_weight"][a["attention_mask"] == 0] == 0).all()
    assert (a["input_ids"][:, -1] != T.token_id(tok, T.PAD)).all()  # left padded


def test_magnitude_prune_hits_only_decoder_linears():
    import jax

    from ellava_jax.toy.train import is_decoder_linear, magnitude_prune

    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.normal(size=shape).astype(np.float32)

    params = {  # the model's tree layout (docs/architecture.md), tiny and without jit
        "language_model": {
            "embed_tokens": {"embedding": w(16, 8)},
            "layers": {  # stacked over 2 layers
                "self_attn": {"q_proj": {"kernel": w(2, 8, 8)}},
                "mlp": {"down_proj": {"kernel": w(2, 20, 8)}},
                "input_layernorm": {"scale": w(2, 8)},
            },
        },
        "multi_modal_projector": {"linear_1": {"kernel": w(8, 8), "bias": w(8)}},
        "lm_head": {"kernel": w(8, 16)},
    }
    pruned = magnitude_prune(params, 0.7)
    n_pruned = 0
    for path, x in jax.tree_util.tree_flatten_with_path(pruned)[0]:
        names = tuple(k.key for k in path)
        zeros = (np.asarray(x) == 0).reshape(len(x), -1).mean(-1)
        if is_decoder_linear(names):  # every layer's matrix at 0.7, not the stack as one
            assert np.abs(zeros - 0.7).max() < 0.02, names
            n_pruned += 1
        else:
            assert (zeros == 0).all(), names
    assert n_pruned == 2


def test_cell_targets_follow_the_pixels():
    """Each visual token's cell (CLIP's row-major patch order) holds the objects drawn there."""
    cells = scenes.patch_cells()
    grid = cells.reshape(8, 8)
    assert (grid[:4, :4] == 0).all() and (grid[:4, 4:] == 1).all()
    assert (grid[4:, :4] == 2).all() and (grid[4:, 4:] == 3).all()
    rng = np.random.default_rng(3)
    for _ in range(30):
        s = scenes.sample_scene(rng)
        t = scenes.cell_targets(s)
        fg = (scenes.render(s) != s.background).any(-1)  # [32, 32] object pixels
        patch_fg = fg.reshape(8, 4, 8, 4).any(axis=(1, 3)).reshape(-1)
        assert patch_fg.any()
        assert (t[cells[patch_fg], 0] > 0).all()  # object pixels only where a cell has one
        for cell in range(4):
            o = s.at(cell)
            if o is None:
                assert t[cell].tolist() == [0, 0, 0]
            else:
                assert scenes.SHAPES[t[cell, 1] - 1] == o.shape
                assert list(scenes.COLOURS)[t[cell, 0] - 1] == o.colour
                assert list(scenes.SIZES)[t[cell, 2] - 1] == o.size


def test_train_stream_multi_turn_rows(tok):
    from ellava_jax.toy.batches import TrainStream

    st = TrainStream(tok, 64, 8, 0, length=224, seed=2, p_caption=0.0, turns=3)
    b = next(st)
    eos, image = T.token_id(tok, T.EOS), T.token_id(tok, T.IMAGE)
    letters = set(T.letter_ids(tok))
    turns = []
    for ids, attn, tgt in zip(b["input_ids"], b["attention_mask"], b["target_mask"]):
        ids, tgt = ids[attn == 1], tgt[attn == 1]
        assert (ids == image).sum() == 64  # one image, placeholders only in the first turn
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        n = int((ids == eos).sum())
        assert text.count("USER:") == text.count("ASSISTANT:") == n
        # every turn's letter and eos are targets, nothing else is
        assert sorted(ids[tgt == 1].tolist()).count(eos) == n
        assert all(int(i) in letters or i == eos for i in ids[tgt == 1])
        turns.append(n)
    assert max(turns) > 1 and max(turns) <= 3
    assert b["cell_targets"].shape == (8, 4, 3)
    # focus and refs: only at positions that predict an answer letter; refs point into the row
    row, pos, head, cell = np.nonzero(b["focus"])
    assert len(row) > 0 and set(head.tolist()) == {0, 1}
    assert all(int(b["input_ids"][r, p + 1]) in letters for r, p in zip(row, pos))
    per_row = [len(set(pos[row == r])) for r in range(8)]
    assert all(n <= t for n, t in zip(per_row, turns))
    row, pos, head, k = np.nonzero(b["refs"] >= 0)
    assert all(int(b["input_ids"][r, p + 1]) in letters for r, p in zip(row, pos))
    # answer_class: at each position that predicts a letter, the answer the letter stands for
    nxt = np.roll(b["input_ids"], -1, axis=1)
    predicts = np.isin(nxt, list(letters)) & (np.roll(b["target_mask"], -1, axis=1) == 1)
    np.testing.assert_array_equal(b["answer_class"] >= 0, predicts)
    space = questions.answer_space()
    for r, p in zip(*np.nonzero(predicts)):
        turn = tok.decode(b["input_ids"][r, : p + 1].tolist()).split("USER:")[-1]
        letter = tok.decode([int(nxt[r, p])]).strip()
        assert f"{letter}. {space[b['answer_class'][r, p]]}\n" in turn, (turn, letter)
    at = b["refs"][row, pos, head, k]
    assert (at < pos).all() and (b["attention_mask"][row, at] == 1).all()
    assert not np.isin(b["input_ids"][row, at], [image, eos]).any()


def test_focus_and_refs_name_what_the_answer_depends_on():
    """Record.focus: per focus head the cells its answer is read from; Record.refs: the
    question's words that name them (the same for both heads)."""
    seen = set()
    for rec, scene in _take(questions.iter_records("train", seed=5), 600):
        seen.add(rec.category)
        if rec.refs is not None:
            assert len(rec.refs) == questions.FOCUS_HEADS
            assert all(f" {w} " in f" {rec.question[:-1]} " for w in rec.refs), rec.question
        if scene is None:
            assert rec.focus is None and rec.refs  # recall names its creature
            continue
        if rec.category == "context":
            assert rec.focus is None  # the object is found through another text, not the words
            continue
        if rec.category == "presence" and rec.choices[rec.answer] == "no":
            assert rec.focus is None  # nothing to look at
            continue
        assert rec.focus is not None and len(rec.focus) == questions.FOCUS_HEADS, rec.question
        assert len(set(rec.focus)) == 1 and len(set(rec.refs or ())) <= 1  # heads read alike
        objs = [scene.at(c) for c in rec.focus[0]]
        answer = rec.choices[rec.answer]
        if rec.category == "count":
            assert rec.focus[0] == questions.WHOLE_IMAGE  # a count reads the whole image
            continue
        assert all(o is not None for o in objs), (rec.question, rec.focus)
        if rec.category == "colour":
            assert [o.colour for o in objs] == [answer]
        elif rec.category == "shape":
            assert [o.shape for o in objs] == [answer]
        elif rec.category == "spatial":
            assert [o.position for o in objs] == [answer]
        elif rec.category == "presence":
            assert [o.kind for o in objs] == [rec.refs[0]]
    assert seen == set(questions.CATEGORY_WEIGHTS)


def test_curriculum_streams(tok):
    """A starter stream asks only its categories, in every turn; unknown names are an error."""
    from ellava_jax.toy.batches import TrainStream

    st = TrainStream(tok, 64, 6, 0, 224, seed=4, p_caption=0.0, turns=3, categories=["shape"])
    b = next(st)
    for ids, attn in zip(b["input_ids"], b["attention_mask"]):
        text = tok.decode(ids[attn == 1].tolist(), skip_special_tokens=False)
        n = text.count("ASSISTANT:")
        assert n >= 1 and text.count("What shape is") == n, text
    with pytest.raises(ValueError, match="'colr'"):
        TrainStream(tok, 64, 2, 0, 160, categories=["colr"])


def test_category_boost(tok):
    """A boost multiplies a category's training weight; the splits are untouched."""
    from ellava_jax.toy import train as toy
    from ellava_jax.toy.batches import TrainStream

    boost = toy.parse_boost("spatial=3, context=2")
    assert boost == {"spatial": 3.0, "context": 2.0}
    st = TrainStream(tok, 64, 2, 0, 224, boost=boost)
    base = questions.image_weights()
    assert st.image_w["spatial"] == pytest.approx(3 * base["spatial"])
    assert st.image_w["colour"] == base["colour"]
    assert questions.CATEGORY_WEIGHTS["spatial"] == base["spatial"]
    with pytest.raises(ValueError, match="'spatial'"):
        toy.parse_boost("spatial")
    with pytest.raises(ValueError, match="'spacial'"):
        TrainStream(tok, 64, 2, 0, 160, boost={"spacial": 2.0})


def test_crowded_question_stream():
    """min_objects draws only scenes that crowded (the curriculum); the default is the mix."""
    crowded = questions.iter_records("train", seed=3, min_objects=4)
    counts = [len(s.objects) for _, s in _take(crowded, 60) if s is not None]
    assert counts and set(counts) == {4}
    natural = [len(s.objects) for _, s in _take(questions.iter_records("train", seed=3), 200) if s]
    assert set(natural) == {1, 2, 3, 4}


def test_answer_letters_that_are_not_one_token_are_refused_in_one_line():
    """A byte-level tokenizer without merges writes ' A' as two tokens: multiple-choice
    scoring cannot read it, and says so instead of a traceback."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ellava_jax.errors import UserError

    vocab = {c: i for i, c in enumerate(["Ġ", "A", "B", "C", "D", "E", "<unk>"])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(UserError, match=r"answer letter ' A' as 2 tokens \[0, 1\]"):
        T.letter_ids(tok)

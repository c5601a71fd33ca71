"""The toy's training stages: the auxiliary vision loss, its pretraining stage, the focus,
reference and answer-readout losses."""

import itertools

import jax
import numpy as np
import pytest

from ellava_jax.data.images import pixel_values
from ellava_jax.model.llava import embed_image
from ellava_jax.toy import scenes
from ellava_jax.toy import train as toy


def _read_cells(config, params, aux, scene_list):
    """Per-token argmax of the aux head: [B, N, 5] (colour, shape, size, cell, kind)."""
    px = pixel_values(np.stack([scenes.render(s) for s in scene_list]))
    logits = np.asarray(embed_image(config, params, px) @ aux["kernel"] + aux["bias"])
    out, start = [], 0
    for n in toy._AUX_CLASSES:
        out.append(logits[..., start : start + n].argmax(-1))
        start += n
    return np.stack(out, -1)


@pytest.mark.slow  # trains the vision tower (about a minute on 2 cores): for retraining the toy
def test_pretrain_vision_learns_what_each_cell_holds():
    """A short stage 1 (300 steps) reads each token's cell and colour off held-out scenes."""
    config = toy.toy_config(64, hidden=32, layers=1, mlp=64)
    tc = toy.TrainConfig(vision_steps=300, vision_batch=32, log_every=1000)
    params = toy.init_toy_params(config, tc)
    aux = toy._aux_init(config, jax.random.key(1))
    before = {k: params[k] for k in ("language_model",)}
    logs = []
    params, aux = toy.pretrain_vision(config, params, aux, tc, logs.append)
    assert params["language_model"] is before["language_model"]  # the decoder is not touched
    first, last = (float(line.split()[4]) for line in (logs[0], logs[-1]))
    assert last < 0.5 * first, logs

    held_out = scenes.iter_split_scenes("validation", 11)
    batch = [next(held_out) for _ in range(32)]
    pred = _read_cells(config, params, aux, batch)
    cells = scenes.patch_cells()
    want = np.stack([scenes.cell_targets(s)[cells] for s in batch])  # [B, N, 3]
    assert (pred[..., 3] == cells[None]).mean() > 0.99  # the token's cell
    assert (pred[..., 0] == want[..., 0]).mean() > 0.8  # colour (or none) of its cell's object


def test_focus_loss_is_kl_from_uniform_on_the_focus_cells():
    """Uniform attention over a row's 64 visual tokens is log 4 from one cell's, log 2 from two
    cells', 0 from the whole image's; each focus head is held to its own cells."""
    config = toy.toy_config(64, hidden=32, layers=1, mlp=64)
    n, t = config.num_image_tokens, 70
    ids = np.full((2, t), 9, np.int32)
    ids[:, 2 : 2 + n] = config.image_token_index
    probs = np.zeros((2, 1, 2, t, t), np.float32)  # [B, kv, group, T, S]
    probs[..., 2 : 2 + n] = 1.0 / n  # every head, every query: uniform on the visual tokens
    focus = np.zeros((2, t, 2, 4), np.float32)  # [B, T, focus heads, cells]
    focus[0, t - 1, :, 3] = 1.0  # row 0: one cell, both heads
    focus[1, t - 1, 0, [0, 2]] = 1.0  # row 1: head 0 two cells, head 1 the whole image
    focus[1, t - 1, 1, :] = 1.0
    got = float(toy._focus_loss(config, probs, ids, focus))
    np.testing.assert_allclose(got, (2 * np.log(4) + np.log(2) + 0) / 4, rtol=1e-4)
    # head 0 of row 0 spread evenly on its cell: nothing left to learn there
    probs[0, 0, 0, t - 1] = 0.0
    probs[0, 0, 0, t - 1, 2 + np.flatnonzero(scenes.patch_cells() == 3)] = 1.0 / 16
    focus[1] = 0.0
    focus[0, :, 1] = 0.0
    np.testing.assert_allclose(float(toy._focus_loss(config, probs, ids, focus)), 0, atol=1e-4)
    assert float(toy._focus_loss(config, probs, ids, 0 * focus)) == 0.0


def test_ref_loss_is_kl_from_uniform_on_the_named_words():
    t = 12
    probs = np.full((1, 1, 2, t, t), 1.0 / t, np.float32)  # uniform over 12 keys
    refs = np.full((1, t, 2, 3), -1, np.int32)
    refs[0, t - 1, 0, :2] = [4, 5]  # head 0: two words
    refs[0, t - 1, 1, 0] = 7  # head 1: one word
    got = float(toy._ref_loss(probs, refs))
    np.testing.assert_allclose(got, (np.log(t / 2) + np.log(t)) / 2, rtol=1e-4)
    probs[0, 0, 1, t - 1] = 0.0
    probs[0, 0, 1, t - 1, 7] = 1.0  # head 1 reads its word only
    refs[0, t - 1, 0] = -1
    np.testing.assert_allclose(float(toy._ref_loss(probs, refs)), 0, atol=1e-4)


def test_readout_loss_is_the_cross_entropy_at_answer_positions():
    """Only positions with an answer class count, each its own class's -log p."""
    head = {"kernel": np.zeros((4, 3), np.float32), "bias": np.log([0.5, 0.25, 0.25])}
    x = np.random.default_rng(0).normal(size=(1, 5, 4)).astype(np.float32)  # kernel 0: unused
    classes = np.full((1, 5), -1, np.int32)
    classes[0, 2], classes[0, 4] = 0, 1
    got = float(toy._readout_loss(head, x, classes))
    np.testing.assert_allclose(got, (np.log(2) + np.log(4)) / 2, rtol=1e-5)
    assert float(toy._readout_loss(head, x, np.full((1, 5), -1, np.int32))) == 0.0


def test_answer_space_holds_every_toy_answer_once():
    from ellava_jax.toy import questions

    space = questions.answer_space()
    assert len(space) == len(set(space))
    for rec, _ in itertools.islice(questions.iter_records("train", seed=3), 300):
        assert space[questions.answer_class(rec)] == rec.choices[rec.answer]
    rec.choices, rec.answer = ["maybe", "never"], 0  # a user's record: not a toy answer
    assert questions.answer_class(rec) == -1

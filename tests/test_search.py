"""The EfficientLLaVA search on the tiny config: policy space, fitness, c_m, resume, end to end."""

from __future__ import annotations

import glob
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ellava_jax import ckpt
from ellava_jax.config import get_preset
from ellava_jax.model import init_params
from ellava_jax.prune.database import build_database
from ellava_jax.prune.hessian import build_calibration_set
from ellava_jax.prune.masks import decoder_linears
from ellava_jax.search.evolve import SearchInterrupted, evolve
from ellava_jax.search.fitness import fitness, loop_losses, population_losses
from ellava_jax.search.policy import PolicySpace
from ellava_jax.search.projector import importance_weights, train_projector
from ellava_jax.search.proxy_batches import FitnessBatches
from ellava_jax.search.proxy_sources import random_proxy
from ellava_jax.search.settings import SearchSettings, load_settings


def test_policy_space_repairs_every_candidate_to_the_budget():
    cfg = get_preset("llava-1.5-7b")
    rng = np.random.default_rng(0)
    for gran in ("layer", "matrix"):
        space = PolicySpace(cfg, 0.5, gran)
        assert space.levels.tolist() == [0.4, 0.45, 0.5, 0.55, 0.6]
        raw = rng.normal(2, 3, (200, space.n_entries))
        idx = np.stack([space.decode(g, rng) for g in raw])
        assert space.is_valid(idx).all()
        assert np.abs(space.mean_sparsity(idx) - 0.5).max() <= 0.01 + 1e-9
        # extremes are repaired, not discarded
        assert space.is_valid(space.repair(np.zeros(space.n_entries, int), rng))
        assert space.is_valid(space.repair(np.full(space.n_entries, 4), rng))
    # same rng seed, same repair
    s = PolicySpace(cfg, 0.3)
    a = s.decode(np.full(32, 4.0), np.random.default_rng(7))
    b = s.decode(np.full(32, 4.0), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_index_of_inverts_sparsities_and_refuses_what_is_not_a_policy():
    space = PolicySpace(get_preset("tiny-llama"), 0.5, "layer")  # 2 layers, levels 0.4-0.6
    rng = np.random.default_rng(0)
    for idx in space.random(8, rng):
        np.testing.assert_array_equal(space.index_of(space.sparsities(idx)), idx)
    assert space.index_of([0.47, 0.53]) is None  # off the grid
    assert space.index_of([0.4, 0.4]) is None  # on the grid, off the budget
    assert space.index_of([0.3, 0.7]) is None  # outside the levels
    assert space.index_of([0.5, 0.5, 0.5]) is None  # another model's layers


def test_importance_weights():
    idx = np.array([[0, 0], [0, 1], [1, 0], [4, 4]])
    c = importance_weights(idx, neighbors=2)
    assert np.isclose(c.sum(), 1.0) and c.argmin() == 3 and np.isclose(c[1], c[2])
    # sums of the 2 nearest squared distances: [1+1, 1+2, 1+2, 25+25] -> softmax(-s)
    s = np.array([2.0, 3.0, 3.0, 50.0])
    np.testing.assert_allclose(c, np.exp(-s) / np.exp(-s).sum())
    np.testing.assert_allclose(importance_weights(idx, mode="uniform"), 0.25)


@pytest.fixture(scope="module")
def tiny_search():
    config = get_preset("tiny")
    params = init_params(config, jax.random.key(0))
    settings = SearchSettings(
        model="tiny",
        p0=0.5,
        population=6,
        rounds=3,
        top_k=4,
        neighbors=3,
        projector_steps=2,
        projector_lr=1e-3,
        proxy_segments=6,
        proxy_seq_len=24,
        proxy_multimodal_samples=3,
    )
    proxy = random_proxy(config, 6, 24, 3)
    calib = build_calibration_set(config, params, proxy.calibration_batches())
    space = PolicySpace(config, 0.5, "layer")
    db = build_database(config, params, calib, space.levels, progress=False)
    fb = FitnessBatches(config, params, proxy, settings)
    return config, params, settings, space, db, fb


def test_database_counts_levels_times_matrices(tiny_search):
    config, params, settings, space, db, fb = tiny_search
    assert db.pruner_calls == 5 * 7 * config.text.num_hidden_layers
    for layer, m in decoder_linears(config):
        sp = (np.asarray(db.kernel(layer, m)) == 0).reshape(5, -1).mean(1)
        np.testing.assert_allclose(sp, space.levels, atol=0.02, err_msg=f"{layer}.{m}")


def test_vmapped_fitness_equals_the_python_loop(tiny_search):
    config, params, settings, space, db, fb = tiny_search
    idx = space.random(6, np.random.default_rng(1))
    parts = fb.parts(params["multi_modal_projector"])
    ours = np.asarray(population_losses(config, params, db, space, idx, parts))
    ref = loop_losses(config, params, db, space, idx, parts)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    streamed = np.asarray(population_losses(config, params, db, space, idx, parts, streaming=True))
    np.testing.assert_allclose(streamed, ref, rtol=1e-5)
    j, loss, g = fitness(config, params, db, space, idx, parts, 0.5)
    np.testing.assert_allclose(np.asarray(j), np.asarray(loss) + 0.5 * np.asarray(g), rtol=1e-6)
    assert (np.asarray(g) < 0).all()  # pruning only removes norm here
    # A population that repeats policies: each distinct one runs once, the scores are the same.
    rep = idx[[0, 3, 0, 1, 3, 3]]
    j2, loss2, g2 = fitness(config, params, db, space, rep, parts, 0.5)
    np.testing.assert_allclose(np.asarray(loss2), ref[[0, 3, 0, 1, 3, 3]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g)[[0, 3, 0, 1, 3, 3]], rtol=1e-6)


def test_g_reading_mean_is_the_per_matrix_mean_of_the_norm_table(tiny_search):
    """G read as a sum (the paper's) or a mean over matrices, each from the database's norm
    ratios looked up by hand: log ||W * M|| / ||W|| of every (layer, matrix) at its level."""
    config, params, settings, space, db, fb = tiny_search
    idx = space.random(4, np.random.default_rng(5))
    keys = sorted(db.log_norm_ratio)
    by_hand = np.array(
        [[db.log_norm_ratio[k][row[space.entry_of(*k)]] for k in keys] for row in idx]
    )
    parts = fb.parts(params["multi_modal_projector"])
    _, loss, g_sum = fitness(config, params, db, space, idx, parts, 0.5)
    j, loss_m, g_mean = fitness(config, params, db, space, idx, parts, 3.0, g_reading="mean")
    np.testing.assert_allclose(np.asarray(g_sum), by_hand.sum(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_mean), by_hand.mean(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss_m), np.asarray(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(j), np.asarray(loss) + 3.0 * by_hand.mean(1), rtol=1e-5)
    with pytest.raises(ValueError, match="G reading 'max'"):
        fitness(config, params, db, space, idx, parts, 0.5, g_reading="max")


def test_row_chunks_give_the_fitness_of_whole_parts(tiny_search):
    """Rows in chunks (the last one padded with unscored rows): the same L_proxy, scanned and
    streamed, and the cache holds the same sums."""
    config, params, settings, space, db, fb = tiny_search
    idx = space.random(6, np.random.default_rng(4))
    parts = fb.parts(params["multi_modal_projector"])
    assert max(p.inputs_embeds.shape[0] for p in parts) > 4  # 4 rows: chunks, one padded
    whole = fitness(config, params, db, space, idx, parts, 0.5)
    for streaming in (False, True):
        for rows, cands in ((4, 3),):  # both kinds of block, each with a padded last one
            chunked = fitness(
                config,
                params,
                db,
                space,
                idx,
                parts,
                0.5,
                streaming=streaming,
                row_chunk=rows,
                candidate_chunk=cands,
            )
            for a, b in zip(chunked, whole):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def test_chunked_proxy_preparation_gives_the_same_features_and_kl_targets(tiny_search):
    """With row_chunk, the tower's features and the dense KL targets are computed that many
    rows at a time (the last pass padded): the same arrays; the KL targets live on the host."""
    config, params, settings, space, db, fb = tiny_search
    proxy = random_proxy(config, 6, 24, 3)
    s = settings.replace(fitness_loss="kl")
    whole = FitnessBatches(config, params, proxy, s)
    chunked = FitnessBatches(config, params, proxy, s.replace(row_chunk=2))
    assert len(whole.mm) == len(chunked.mm) and len(whole.text) == len(chunked.text)
    for a, b in zip(whole.mm + whole.text, chunked.mm + chunked.text):
        assert isinstance(b.dense_logp, np.ndarray)
        np.testing.assert_allclose(b.dense_logp, a.dense_logp, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole.mm, chunked.mm):
        a_f, b_f = np.asarray(a.vision_feats), np.asarray(b.vision_feats)
        np.testing.assert_allclose(b_f, a_f, rtol=1e-5, atol=1e-6)  # batch size moves the 7th digit


def test_population_terms_say_which_term_ranks_the_population():
    from ellava_jax.search.evolve import population_terms

    loss = np.array([4.0, 4.1, 4.2, 4.3])
    g = np.array([-1.0, -3.0, -2.0, -5.0])  # eta*G spans 2, L spans 0.3: G ranks
    t = population_terms(loss + 0.5 * g, loss, g, 0.5)
    assert t["rank_corr_j_g"] == pytest.approx(1.0) and t["rank_corr_j_loss"] < 0
    assert t["loss_std"] == pytest.approx(np.std(loss, ddof=1))
    assert t["eta_g_std"] == pytest.approx(0.5 * np.std(g, ddof=1))
    t0 = population_terms(loss, loss, g, 0.0)  # eta 0: L alone ranks
    assert t0["rank_corr_j_loss"] == pytest.approx(1.0) and t0["eta_g_std"] == 0.0


def test_fitness_caches_the_text_parts_per_policy(tiny_search):
    """Text segments never see the projector: their loss is kept per policy, and a new
    projector changes only the multimodal part of the score."""
    config, params, settings, space, db, fb = tiny_search
    idx = space.random(6, np.random.default_rng(3))
    proj = params["multi_modal_projector"]
    cache = {}
    _, plain, _ = fitness(config, params, db, space, idx, fb.parts(proj), 0.5)
    _, cached, _ = fitness(config, params, db, space, idx, fb.parts(proj), 0.5, cache=cache)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(plain), rtol=1e-6)
    n_text = sum(p.fixed for p in fb.parts(proj))
    assert n_text >= 1 and len(cache) == n_text * len(np.unique(idx, axis=0))
    moved = jax.tree_util.tree_map(lambda x: x * 1.5, proj)
    p2 = dict(params, multi_modal_projector=moved)
    _, fresh, _ = fitness(config, p2, db, space, idx, fb.parts(moved), 0.5)
    _, again, _ = fitness(config, p2, db, space, idx, fb.parts(moved), 0.5, cache=cache)
    np.testing.assert_allclose(np.asarray(again), np.asarray(fresh), rtol=1e-6)
    assert not np.allclose(np.asarray(fresh), np.asarray(plain))  # the projector did matter
    assert len(cache) == n_text * len(np.unique(idx, axis=0))  # nothing new to score


def test_length_groups_give_the_loss_of_one_padded_batch(tiny_search):
    """Samples of different lengths, grouped by length (images following their samples), score
    the same L_proxy as all samples left-padded into one batch."""
    from ellava_jax.model.losses import next_token_targets
    from ellava_jax.prune.hessian import left_pad
    from ellava_jax.search.fitness import ProxyBatch
    from ellava_jax.search.proxy_sources import ProxyData, length_buckets

    config, params, settings, space, db, _ = tiny_search
    proxy = random_proxy(config, 6, 24, 6, seed=5)
    cut = np.array([0, 2, 1, 0, 2, 1])  # multimodal rows lose 0-2 leading tokens
    mm_mask = proxy.mm_mask.copy()
    for r, c in enumerate(cut):
        mm_mask[r, :c] = 0
    text_mask = proxy.text_mask.copy()
    text_mask[:3, :5] = 0
    proxy = ProxyData(proxy.text_ids, text_mask, proxy.mm_ids, mm_mask, proxy.mm_pixels)
    assert [len(g) for g in length_buckets(mm_mask.sum(1), 4, 1)] == [2, 2, 2]
    grouped = FitnessBatches(config, params, proxy, settings, max_buckets=4, min_rows=1)
    parts = grouped.parts(params["multi_modal_projector"])
    assert len(parts) == 5 and [p.fixed for p in parts] == [True, True, False, False, False]
    # the reference: every sample left-padded to one length, images in their original order
    from ellava_jax.model.llava import embed_inputs

    t = max(proxy.text_ids.shape[1], proxy.mm_ids.shape[1])
    ids = np.concatenate([left_pad(proxy.text_ids, t), left_pad(proxy.mm_ids, t)])
    mask = np.concatenate([left_pad(text_mask, t), left_pad(mm_mask, t)])
    emb_text = embed_inputs(config, params, jnp.asarray(ids[:6]), None)
    emb_mm = embed_inputs(config, params, jnp.asarray(ids[6:]), jnp.asarray(proxy.mm_pixels))
    labels, lmask = next_token_targets(config, ids, mask)
    one = ProxyBatch(jnp.concatenate([emb_text, emb_mm]), jnp.asarray(mask), labels, lmask)
    idx = space.random(4, np.random.default_rng(4))
    ref = np.asarray(population_losses(config, params, db, space, idx, one))
    ours = np.asarray(population_losses(config, params, db, space, idx, parts))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_projector_training_moves_only_the_projector_and_lowers_its_loss(tiny_search):
    config, params, settings, space, db, fb = tiny_search
    idx = space.random(4, np.random.default_rng(2))
    c = importance_weights(idx, 3)
    new, losses = train_projector(config, params, db, space, idx, c, fb.training, steps=8, lr=1e-4)
    assert losses[-1] < losses[0]
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(
        params["multi_modal_projector"]
    )
    assert not np.allclose(
        new["linear_1"]["kernel"], params["multi_modal_projector"]["linear_1"]["kernel"]
    )


def test_streamed_projector_step_gives_the_unstreamed_projector(tiny_search):
    """The projector's gradient taken layer by layer (forward keeping each layer's input, on
    the device or the host, backward by one vjp per layer), in blocks of rows x candidates (the
    last ones padded), equals the one-program gradient over the whole decoder to 1e-5; so do
    the losses, and the trained projector to 1e-4 of its update's norm (Adam's step is about lr
    wherever the gradient is not zero, so summation order moves a near-zero element by up to
    that: 1.2e-6 at lr 1e-3 here)."""
    from ellava_jax.search.fitness import layer_entries
    from ellava_jax.search.projector import _streamed_gradient, _weighted_loss

    config, params, settings, space, db, fb = tiny_search
    idx = space.random(4, np.random.default_rng(2))
    c = importance_weights(idx, 3)
    proj = params["multi_modal_projector"]
    lv = jnp.asarray(idx[:, layer_entries(space)])
    w = jnp.asarray(c, jnp.float32)
    assert max(m.input_ids.shape[0] for m in fb.training) > 2  # 2 rows: a padded chunk
    (loss, _), grad = jax.value_and_grad(_weighted_loss, has_aux=True)(
        proj, config, params, db.device_stacks(), lv, w, fb.training, (None, None)
    )
    kw = dict(steps=3, lr=1e-3, mass=1.0)
    whole, whole_losses = train_projector(config, params, db, space, idx, c, fb.training, **kw)
    for how in (
        dict(streaming=True, row_chunk=2, candidate_chunk=3, offload=True),
        dict(streaming=False, row_chunk=2, candidate_chunk=3),
    ):
        if how["streaming"]:
            chunks = (how.get("candidate_chunk"), how.get("row_chunk"))
            l2, g2 = _streamed_gradient(
                config, params, db, lv, w, fb.training, proj, chunks, how.get("offload", False)
            )
            np.testing.assert_allclose(l2, float(loss), rtol=1e-5, atol=1e-7)
            for x, y in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(grad)):
                y = np.asarray(y)
                np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-5 * abs(y).max())
        new, losses = train_projector(config, params, db, space, idx, c, fb.training, **kw, **how)
        np.testing.assert_allclose(losses, whole_losses, rtol=1e-5, atol=1e-7, err_msg=str(how))
        for x, y, x0 in zip(*(jax.tree_util.tree_leaves(t) for t in (new, whole, proj))):
            x, y, x0 = (np.asarray(v, np.float64) for v in (x, y, x0))
            assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(y - x0), how
    with pytest.raises(ValueError, match="streaming only"):
        train_projector(config, params, db, space, idx, c, fb.training, **kw, offload=True)


def test_projector_trains_on_the_candidates_that_hold_the_weight(tiny_search):
    """c_m puts nearly all weight on a few candidates; dropping the rest changes nothing real."""
    from ellava_jax.search.projector import merge_duplicates, significant

    assert list(significant([0.5, 1e-9, 0.3, 0.2 - 1e-9])) == [0, 2, 3, 1]  # all needed -> 4
    assert list(significant([0.6, 1e-9, 0.4, 0.0])) == [0, 2]
    assert list(significant([1e-9, 1.0, 0.0])) == [1]
    assert list(significant([0.1, 0.6, 0.3], mass=1.0)) == [1, 2, 0]
    rows, w = merge_duplicates(np.array([[1, 2], [0, 0], [1, 2], [3, 1]]), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(rows, [[1, 2], [0, 0], [3, 1]])
    np.testing.assert_allclose(w, [0.4, 0.2, 0.4])
    config, params, settings, space, db, fb = tiny_search
    idx = space.random(4, np.random.default_rng(2))
    c = np.array([0.55, 0.45 - 2e-6, 1e-6, 1e-6])
    kw = dict(steps=4, lr=1e-3)
    every = train_projector(config, params, db, space, idx, c, fb.training, mass=1.0, **kw)
    two = train_projector(config, params, db, space, idx, c, fb.training, **kw)
    only_two = train_projector(
        config, params, db, space, idx[:2], c[:2] / c[:2].sum(), fb.training, **kw
    )
    doubled = train_projector(
        config, params, db, space, idx[[0, 1, 1]], [0.55, 0.2, 0.25], fb.training, **kw
    )
    for a, b in ((two, only_two), (two, every), (two, doubled)):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-4)
        for x, y in zip(jax.tree_util.tree_leaves(a[0]), jax.tree_util.tree_leaves(b[0])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)


def _evolve(tiny_search, ckdir, stop=None, staged=False):
    """The tiny search's evolution; `staged`: staged selection (3 stages) and projector
    minibatches of 2 samples, in a FitnessBatches of its own as a resumed process builds."""
    config, params, settings, space, db, fb = tiny_search
    if staged:
        settings = settings.replace(
            selection="staged",
            stage_shares=[0.34, 0.67, 1.0],
            stage_survivors=[3, 2],
            projector_samples=2,
        )
        fb = FitnessBatches(config, params, random_proxy(config, 6, 24, 3), settings)
        fb.set_stages(settings.stage_shares, settings.seed)
    caches = {}  # one per search, as a resumed process starts with none

    def score(projector, idx, stage=None):
        p = dict(params, multi_modal_projector=projector)
        parts = fb.parts(projector, stage)
        return fitness(
            config, p, db, space, idx, parts, settings.eta, cache=caches.setdefault(stage, {})
        )

    def train(projector, top, c, round_index=0):
        p = dict(params, multi_modal_projector=projector)
        batches = None
        if settings.projector_samples is not None:
            batches = fb.training_samples(settings.projector_samples, 0, round_index, 2)
        return train_projector(
            config, p, db, space, top, c, fb.training, steps=2, lr=1e-3, step_batches=batches
        )

    cps = ckpt.RoundCheckpoints(ckdir)
    try:
        return evolve(
            settings,
            params,
            space,
            score,
            train,
            cps,
            resume=cps.latest_intact(),
            stop_after_round=stop,
        )
    finally:
        cps.close()


@pytest.mark.parametrize(
    "staged",
    # full selection resumes through the same checkpoints as staged, which adds its slices
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["full", "staged"],
)
def test_killed_search_resumes_to_the_same_policy(tiny_search, tmp_path, staged):
    full = _evolve(tiny_search, tmp_path / "a", staged=staged)
    again = _evolve(tiny_search, tmp_path / "b", staged=staged)
    np.testing.assert_array_equal(full.best_idx, again.best_idx)  # same seed, same policy
    with pytest.raises(SearchInterrupted):
        _evolve(tiny_search, tmp_path / "c", stop=0, staged=staged)
    resumed = _evolve(tiny_search, tmp_path / "c", staged=staged)
    np.testing.assert_array_equal(resumed.best_idx, full.best_idx)
    np.testing.assert_array_equal(resumed.archive_idx, full.archive_idx)
    np.testing.assert_allclose(resumed.archive_fitness, full.archive_fitness, rtol=1e-6)
    assert [r.round for r in resumed.rounds] == [0, 1, 2]
    for a, b in zip(
        jax.tree_util.tree_leaves(resumed.projector), jax.tree_util.tree_leaves(full.projector)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_staged_scores_rank_the_furthest_stage_first_then_j():
    """Every candidate on stage 1, the best 3 on stage 2, the best 1 on stage 3; a candidate's
    J is its last stage's; the ranking puts the furthest stage first; the strategy gets ranks."""
    from ellava_jax.search.evolve import _ranks_of, staged_scores

    s = SearchSettings(
        model="tiny",
        population=6,
        top_k=4,
        selection="staged",
        stage_shares=[0.25, 0.5, 1.0],
        stage_survivors=[3, 1],
    )
    idx = np.arange(6)[:, None]  # candidate i's "policy" is [i]
    base = np.array([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    seen = []

    def score(projector, rows, stage):  # each stage reads the candidate worse by 10 x stage
        seen.append((stage, rows[:, 0].tolist()))
        j = base[rows[:, 0]] + 10.0 * stage
        return j, j - 1.0, np.zeros(len(rows))

    sc = staged_scores(s, idx, None, score)
    assert seen == [(0, [0, 1, 2, 3, 4, 5]), (1, [1, 3, 5]), (2, [1])]
    np.testing.assert_array_equal(sc["reached"], [0, 2, 0, 1, 0, 1])
    np.testing.assert_array_equal(sc["j"], [5, 21, 4, 12, 6, 13])
    np.testing.assert_array_equal(sc["order"], [1, 3, 5, 2, 0, 4])
    np.testing.assert_array_equal(_ranks_of(sc["order"]), [4, 0, 3, 1, 5, 2])
    np.testing.assert_array_equal(sc["first"]["j"], base)
    assert [(x["share"], x["scored"], x["best"]) for x in sc["stages"]] == [
        (0.25, 6, 1.0),
        (0.5, 3, 11.0),
        (1.0, 1, 21.0),
    ]
    one = staged_scores(s.replace(selection="full"), idx, None, lambda p, r: (base[r[:, 0]],) * 3)
    np.testing.assert_array_equal(one["order"], np.argsort(base, kind="stable"))


def test_stage_slices_are_nested_fixed_by_the_seed_and_score_like_a_smaller_proxy(tiny_search):
    """A stage reads ceil(share x n) samples of each kind, nested and the same for one seed;
    J on a stage's slice equals J on a proxy of those samples alone; a share of 1 is the
    whole proxy with its cache."""
    config, params, settings, space, db, _ = tiny_search
    proxy = random_proxy(config, 6, 24, 3)
    fb = FitnessBatches(config, params, proxy, settings.replace(fitness_loss="kl"))
    fb.set_stages([0.34, 0.67, 1.0], seed=3)
    keep = fb.stage_samples
    assert [(len(t), len(m)) for t, m in keep] == [(3, 2), (5, 3), (6, 3)]
    for (t0, m0), (t1, m1) in zip(keep, keep[1:]):
        assert set(t0) <= set(t1) and set(m0) <= set(m1)
    again = FitnessBatches(config, params, proxy, settings.replace(fitness_loss="kl"))
    again.set_stages([0.34, 0.67, 1.0], seed=3)
    assert all(
        (a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(keep, again.stage_samples)
    )
    assert fb.stages[2] == (fb.text, fb.mm) and fb.cache_of(2) is fb.cache
    t, m = keep[0]
    sub = type(proxy)(
        proxy.text_ids[t], proxy.text_mask[t], proxy.mm_ids[m], proxy.mm_mask[m], proxy.mm_pixels[m]
    )
    small = FitnessBatches(config, params, sub, settings.replace(fitness_loss="kl"))
    idx = space.random(6, np.random.default_rng(2))
    proj = params["multi_modal_projector"]
    j_stage = fitness(config, params, db, space, idx, fb.parts(proj, 0), settings.eta)[0]
    j_small = fitness(config, params, db, space, idx, small.parts(proj), settings.eta)[0]
    np.testing.assert_allclose(np.asarray(j_stage), np.asarray(j_small), rtol=1e-5)


def test_projector_minibatches_take_every_sample_in_turn_and_whole_ones_train_the_same(
    tiny_search,
):
    """Minibatches of 1 of 3 samples over 3 steps use each sample once; minibatches of all
    samples (one group padded to the longest) train the projector as the grouped samples do."""
    config, params, settings, space, db, _ = tiny_search
    s = settings.replace(projector_samples=3)
    fb = FitnessBatches(config, params, random_proxy(config, 6, 24, 3), s)
    steps = fb.training_samples(1, 0, 0, 3)
    firsts = [np.asarray(b[0].input_ids).tobytes() for b in steps]
    assert len(set(firsts)) == 3 and all(b[0].input_ids.shape[0] == 1 for b in steps)
    # 2 steps a round: round 1 starts where round 0 stopped (the third sample), then wraps
    r0, r1 = (
        [np.asarray(b[0].input_ids).tobytes() for b in fb.training_samples(1, 0, r, 2)]
        for r in (0, 1)
    )
    assert set(r0) | {r1[0]} == set(firsts) and r1[1] == r0[0]
    idx = space.random(2, np.random.default_rng(4))
    c = np.array([0.7, 0.3])
    kw = dict(lr=1e-3, mass=1.0)
    whole = train_projector(config, params, db, space, idx, c, fb.training, steps=2, **kw)
    for streaming in (False, True):
        mini = train_projector(
            config,
            params,
            db,
            space,
            idx,
            c,
            None,
            steps=0,
            step_batches=fb.training_samples(3, 0, 0, 2),
            streaming=streaming,
            **kw,
        )
        # float32 losses from a padded group and from grouped samples sum in another order:
        # 1.8e-5 apart on an AVX2 CPU, so the parameters' tolerance (1e-4) holds for both
        np.testing.assert_allclose(mini[1], whole[1], rtol=1e-4)
        for x, y in zip(jax.tree_util.tree_leaves(mini[0]), jax.tree_util.tree_leaves(whole[0])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_staged_settings_are_checked():
    from ellava_jax.search.settings import SettingError

    for kw, msg in (
        (dict(stage_shares=[0.5, 0.25], stage_survivors=[2]), "shares must increase"),
        (dict(stage_shares=[0.1, 0.5, 1.0], stage_survivors=[2]), "needs 2 numbers"),
        (dict(stage_shares=[0.1, 0.5, 1.0], stage_survivors=[2, 4]), "must decrease"),
        (dict(stage_shares=[0.1, 1.0], stage_survivors=[16]), "fewer than population=16"),
        (dict(stage_shares=[0.1, 1.5], stage_survivors=[2]), "stage_shares"),
    ):
        with pytest.raises(SettingError, match=msg):
            SearchSettings(selection="staged", **kw)
    assert SearchSettings(selection="staged").stages() == [(0.03125, 16), (0.5, 1)]
    assert SearchSettings().stages() == [(1.0, 16)]


def test_selection_settings_at_their_off_values_leave_the_fingerprint_unchanged():
    """A run made before staged selection or projector minibatches existed still resumes: at
    their off values they are not in the fingerprint."""
    from ellava_jax.app.resume import fingerprint

    new = ("selection", "stage_shares", "stage_survivors", "projector_samples")
    plain = fingerprint(SearchSettings(model="tiny"))
    assert not set(new) & set(plain)
    assert fingerprint(SearchSettings(model="tiny", stage_shares=[0.25, 1.0])) == plain
    staged = fingerprint(SearchSettings(model="tiny", selection="staged"))
    assert staged == plain | {
        "selection": "staged",
        "stage_shares": [0.03125, 0.5],
        "stage_survivors": [1],
    }
    assert fingerprint(SearchSettings(model="tiny", projector_samples=8)) == plain | {
        "projector_samples": 8
    }


def test_every_config_file_loads():
    files = sorted(glob.glob("configs/*.yaml"))
    assert files
    for f in files:
        s = load_settings(f)
        PolicySpace(
            get_preset("tiny") if s.model in ("tiny", "toy") else get_preset("llava-1.5-7b"), s.p0
        )


def test_unknown_setting_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("p0: 0.5\npopulaton: 16\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown setting\(s\) \['populaton'\]"):
        load_settings(str(p))


def test_search_command_end_to_end_on_tiny(tmp_path, capsys):
    from ellava_jax.cli import main

    out = tmp_path / "run"
    assert (
        main(["search", "--config", "configs/tiny.yaml", "--out", str(out), "--no-eval", "--json"])
        == 0
    )
    res = json.loads((out / "result.json").read_text())
    n = get_preset("tiny").text.num_hidden_layers
    assert len(res["policy"]) == n and abs(res["mean_sparsity"] - 0.5) <= 0.01
    assert abs(res["measured_sparsity"] - res["mean_sparsity"]) < 0.01
    assert res["obs_calls"] == {
        "database": 5 * 7 * n,
        "final_reprune": 7 * n,
        "search_total": 6 * 7 * n,
        "uniform_baseline": 7 * n,
    }
    t = res["timings_s"]
    for phase in ("database", "search", "final_prune", "uniform_prune"):
        assert 0 <= t[f"{phase}_compile_s"] <= t[f"{phase}_s"], phase
    work = sum(t[f"{p}_s"] - t[f"{p}_compile_s"] for p in ("database", "search", "final_prune"))
    uniform_work = t["uniform_prune_s"] - t["uniform_prune_compile_s"]
    assert res["cost_ratio_excluding_compile"] == pytest.approx(work / uniform_work)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 3 and all(len(r["c_m"]) == 6 for r in rounds)
    assert (out / "fitness.png").stat().st_size > 1000 and (out / "policy.png").exists()
    from convert.hf import load_hf_llava

    cfg, pruned = load_hf_llava(out / "model")
    assert cfg == get_preset("tiny")
    restored = ckpt.load_tree(str(out / "checkpoint"), pruned)
    np.testing.assert_array_equal(restored["lm_head"]["kernel"], pruned["lm_head"]["kernel"])


def test_right_padded_proxy_is_refused(tiny_search):
    from ellava_jax.search.proxy_sources import ProxyData

    config, params, settings, *_ = tiny_search
    proxy = random_proxy(config, 4, 16, 2)
    text_mask = proxy.text_mask.copy()
    text_mask[0, -3:] = 0  # real tokens first, padding last
    bad = ProxyData(proxy.text_ids, text_mask, proxy.mm_ids, proxy.mm_mask, proxy.mm_pixels)
    with pytest.raises(ValueError, match="left-padded"):
        FitnessBatches(config, params, bad, settings)


@pytest.mark.parametrize("n_in", [576, 200])
def test_level_database_prunes_widths_that_are_not_a_multiple_of_the_block(n_in):
    """SmolLM2's 576-wide inputs crashed XLA:CPU's compiler under vmap; every width must work
    and give, level by level, what a single SparseGPT call gives."""
    from ellava_jax.prune.database import _prune_levels
    from ellava_jax.prune.obs import sparsegpt

    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((n_in, 64)), jnp.float32)
    x = rng.standard_normal((256, n_in)).astype(np.float32)
    hessian = jnp.asarray(2 / 256 * x.T @ x)
    levels = [0.4, 0.5, 0.6]
    stack = np.asarray(_prune_levels(kernel, hessian, jnp.asarray(levels, jnp.float32)))
    for i, s in enumerate(levels):
        np.testing.assert_array_equal(stack[i], np.asarray(sparsegpt(kernel, hessian, s)[0]))
        assert abs((stack[i] == 0).mean() - s) < 0.01

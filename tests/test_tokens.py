"""FitPrune visual-token pruning: recipe, pruned prefill, decoding on reduced caches, FLOPs."""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ellava_jax.eval.flops import (
    decoder_prefill_flops,
    flops_reduction,
    layer_prefill_flops,
    matmul_flops_of_jaxpr,
    sparsity_of_params,
    total_flops,
)
from ellava_jax.model import embed_inputs, forward, generate, init_params, lm_head
from ellava_jax.model.llama import (
    LlamaDecoderLayer,
    RMSNorm,
    attention_mask_4d,
    layer_params,
    positions_from_mask,
    rope_cos_sin,
    unstack_layers,
    with_layers,
)
from ellava_jax.tokens.apply import (
    attention,
    forward_with_recipe,
    generate_with_recipe,
    layer_widths,
    prefill_layers,
)
from ellava_jax.tokens.fit import calibration_divergence, fit_recipe, random_calibration
from ellava_jax.tokens.recipe import Recipe, RecipeMismatchError, keep_all, model_signature
from tests.conftest import prompt_batch, tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    params = init_params(config, jax.random.key(0))
    # Sharper attention than the 0.02-std init gives, so token rankings have no near-ties.
    attn = params["language_model"]["layers"]["self_attn"]  # stacked over the layers
    for name in ("q_proj", "k_proj"):
        attn[name]["kernel"] = attn[name]["kernel"] * 12.0
    return config, params


def _batch(config, seed=1):
    # Row 0: two images with text between and after; row 1: one image, left padding;
    # row 2: text only (no image).
    ids, mask, pix = prompt_batch(config, images_per_row=(2, 1), pad=(0, 5), seed=seed)
    text_row = np.zeros((1, ids.shape[1]), ids.dtype)
    text_row[0, -6:] = [5, 6, 7, 8, 9, 10]
    tmask = (text_row > 0).astype(mask.dtype)
    return np.concatenate([ids, text_row]), np.concatenate([mask, tmask]), pix


# ---------------------------------------------------------------------------------------------
# A reference: the dense model with dropped tokens masked out as keys (original positions)


@partial(jax.jit, static_argnums=0)
def _layer_with_probs(cfg, p, h, cos, sin, m):
    (h, _), state = LlamaDecoderLayer(cfg).apply(
        {"params": p}, h, cos, sin, m, mutable=["intermediates"]
    )
    return h, state


def _reference(config, params, ids, mask, pix, keep, alive_per_layer=None):
    """Layer-by-layer dense decoder; from layer l+1 on, tokens layer l dropped are masked keys.

    Without alive_per_layer, layer l ranks each image's alive visual tokens by the attention
    they get from text queries (max over heads, numpy) and keeps the top keep[l]. Returns
    (logits, alive masks entering each layer, alive mask after the last layer).
    """
    cfg = config.text
    n = config.num_image_tokens
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    h = embed_inputs(config, params, ids_j, None if pix is None else jnp.asarray(pix))
    valid = np.asarray(mask) > 0
    vis = (np.asarray(ids) == config.image_token_index) & valid
    img = np.where(vis, (np.cumsum(vis, axis=1) - 1) // n, -1)
    cos, sin = rope_cos_sin(positions_from_mask(mask_j), cfg.head_dim, cfg.rope_theta, h.dtype)
    alive = valid.copy()
    entering = []
    for layer in range(cfg.num_hidden_layers):
        if alive_per_layer is not None:
            alive = alive_per_layer[layer]
        entering.append(alive.copy())
        m = attention_mask_4d(jnp.asarray(alive), h.shape[1], 0)
        h, state = _layer_with_probs(cfg, layer_params(params, layer), h, cos, sin, m)
        if alive_per_layer is not None:
            continue
        probs = np.asarray(state["intermediates"]["self_attn"]["attn_probs"][0])
        pm = probs.max(axis=(1, 2))  # [B, Tq, Tk]
        text_q = valid & ~vis
        cross = (pm * text_q[:, :, None]).sum(axis=1)
        for b in range(ids.shape[0]):
            for g in range(img[b].max() + 1):
                slots = np.nonzero((img[b] == g) & alive[b])[0]
                order = slots[np.argsort(-cross[b, slots], kind="stable")]
                alive[b, order[keep[layer] :]] = False
    hn = RMSNorm(cfg.rms_norm_eps).apply({"params": params["language_model"]["norm"]}, h)
    return np.asarray(lm_head(config, params, hn)), entering, alive


# ---------------------------------------------------------------------------------------------
# Application


def test_keep_all_recipe_equals_forward_and_generate_exactly(tiny_model):
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    recipe = keep_all(config)
    ref = np.asarray(forward(config, params, ids, pix, mask))
    ours = np.asarray(forward_with_recipe(config, params, ids, pix, mask, recipe))
    np.testing.assert_array_equal(ours, ref)
    g_ref = generate(config, params, ids, pix, mask, max_new_tokens=6)
    g_ours = generate_with_recipe(config, params, ids, pix, mask, recipe, max_new_tokens=6)
    np.testing.assert_array_equal(g_ours, g_ref)


@pytest.mark.parametrize("keep", [(10, 10), (12, 3), (16, 2)])
def test_pruned_prefill_equals_masked_reference(tiny_model, keep):
    """Slicing hidden states, positions and masks == masking the dropped tokens out (exactly
    what removal means), with the same per-layer ranking by attention from text tokens."""
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    ref, _, alive = _reference(config, params, ids, mask, pix, keep)
    ours, kept = forward_with_recipe(config, params, ids, pix, mask, keep, return_kept=True)
    ours, kept = np.asarray(ours), np.asarray(kept)
    np.testing.assert_array_equal(kept, alive)
    np.testing.assert_allclose(ours[kept], ref[kept], atol=2e-5, rtol=1e-5)
    assert np.all(ours[(mask > 0) & ~kept] == 0)
    # Each row keeps its text and keep[-1] tokens per image.
    images = np.array([2, 1, 0])
    text = ((mask > 0) & (ids != config.image_token_index)).sum(1)
    np.testing.assert_array_equal(kept.sum(1), text + images * keep[-1])


def test_dropping_changes_only_what_it_should(tiny_model):
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    dense = np.asarray(forward(config, params, ids, pix, mask))
    ours, kept = forward_with_recipe(config, params, ids, pix, mask, (8, 2), return_kept=True)
    ours, kept = np.asarray(ours), np.asarray(kept)
    valid = mask > 0
    # The text-only row is untouched.
    np.testing.assert_allclose(ours[2][valid[2]], dense[2][valid[2]], atol=1e-5, rtol=1e-5)
    # Text before the first image cannot see any image (causal): unchanged.
    first_img = np.argmax(ids[:2] == config.image_token_index, axis=1)
    for b in range(2):
        pre = slice(ids.shape[1] - valid[b].sum(), first_img[b])
        np.testing.assert_allclose(ours[b, pre], dense[b, pre], atol=1e-5, rtol=1e-5)
    # The last position (what generation reads) of image rows does change.
    assert np.abs(ours[:2, -1] - dense[:2, -1]).max() > 1e-4


def test_first_layer_keeps_the_tokens_text_attends_to_most(tiny_model):
    """Layer 0's ranking comes from layer 0's own attention (the model's sown probs)."""
    config, params = tiny_model
    ids, mask, pix = prompt_batch(config, images_per_row=(1,), pad=(0,), seed=4)
    _, state = _layer_with_probs(
        config.text,
        layer_params(params, 0),
        embed_inputs(config, params, jnp.asarray(ids), jnp.asarray(pix)),
        *rope_cos_sin(
            positions_from_mask(jnp.asarray(mask)), 16, config.text.rope_theta, jnp.float32
        ),
        attention_mask_4d(jnp.asarray(mask), ids.shape[1]),
    )
    pm = np.asarray(state["intermediates"]["self_attn"]["attn_probs"][0]).max(axis=(1, 2))[0]
    vis = ids[0] == config.image_token_index
    score = pm[~vis].sum(axis=0)
    top = set(np.nonzero(vis)[0][np.argsort(-score[vis])[:5]])
    keep = (5,) * config.text.num_hidden_layers
    _, kept = forward_with_recipe(config, params, ids, pix, mask, keep, return_kept=True)
    assert set(np.nonzero(np.asarray(kept)[0] & vis)[0]) == top
    # FitPrune's inference ranking: that times the mean attention from the image's own tokens.
    score = score * pm[vis].mean(axis=0)
    top = set(np.nonzero(vis)[0][np.argsort(-score[vis])[:5]])
    _, kept = forward_with_recipe(
        config, params, ids, pix, mask, keep, score="text_x_visual", return_kept=True
    )
    assert set(np.nonzero(np.asarray(kept)[0] & vis)[0]) == top


def test_attention_matches_the_model_module(tiny_model):
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    p = layer_params(params, 1)
    h = embed_inputs(config, params, jnp.asarray(ids), jnp.asarray(pix))
    cos, sin = rope_cos_sin(positions_from_mask(jnp.asarray(mask)), 16, 10000.0, h.dtype)
    m = attention_mask_4d(jnp.asarray(mask), ids.shape[1])
    _, state = LlamaDecoderLayer(config.text).apply(
        {"params": p}, h, cos, sin, m, mutable=["intermediates"]
    )
    x = state["intermediates"]["attn_in"][0]
    out, probs, _ = attention(config.text, p["self_attn"], x, cos, sin, m)
    inter = state["intermediates"]["self_attn"]
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(inter["attn_probs"][0]))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(inter["o_in"][0]))


def test_generate_on_reduced_cache_matches_reference(tiny_model):
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    keep = (9, 3)
    n_new = 4
    ours = generate_with_recipe(config, params, ids, pix, mask, keep, max_new_tokens=n_new)
    # Reference, teacher-forced on our tokens: with the prefill's per-layer token sets fixed
    # and every generated token visible, the greedy token at each step must be ours.
    _, entering, _ = _reference(config, params, ids, mask, pix, keep)
    new = ours[:, ids.shape[1] :]
    k = new.shape[1]
    ext_mask = np.concatenate([mask, np.ones_like(new)], 1)
    alive = [np.concatenate([a, np.ones((a.shape[0], k), bool)], 1) for a in entering]
    logits, _, _ = _reference(config, params, ours, ext_mask, pix, keep, alive)
    t = ids.shape[1]
    greedy = np.argmax(logits[:, t - 1 : t - 1 + k], axis=-1)
    eos = config.text.eos_token_id
    live = np.cumsum(np.pad(new == eos, ((0, 0), (1, 0)))[:, :-1], axis=1) == 0  # up to eos
    np.testing.assert_array_equal(greedy[live], new[live])


def test_last_logits_for_the_eval_harness(tiny_model, tmp_path):
    from ellava_jax.eval.harness import last_logits
    from ellava_jax.tokens import load_recipe, recipe_last_logits

    config, params = tiny_model
    ids, mask, pix = _batch(config)
    args = (jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))
    keep_all(config).save(tmp_path / "all.json")
    fn = recipe_last_logits(load_recipe(tmp_path / "all.json", config))
    np.testing.assert_allclose(
        np.asarray(fn(config, params, *args)),
        np.asarray(last_logits(config, params, *args)),
        atol=1e-6,
    )
    keep = (8, 3)
    full = np.asarray(forward_with_recipe(config, params, ids, pix, mask, keep))
    np.testing.assert_allclose(
        np.asarray(recipe_last_logits(keep)(config, params, *args)), full[:, -1], atol=1e-6
    )


def test_jit_with_static_widths(tiny_model):
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    keep = (12, 3)
    widths = layer_widths(config, keep, ids, mask)
    assert widths[-1] < ids.shape[1]
    padded = layer_widths(config, keep, ids, mask, pad_to=8)
    assert all(p % 8 == 0 or p == ids.shape[1] for p in padded)
    assert all(w <= p for w, p in zip(widths, padded))
    f = jax.jit(lambda p, i, x, m: forward_with_recipe(config, p, i, x, m, keep, widths=widths))
    np.testing.assert_allclose(
        np.asarray(f(params, jnp.asarray(ids), jnp.asarray(pix), jnp.asarray(mask))),
        np.asarray(forward_with_recipe(config, params, ids, pix, mask, keep)),
        atol=1e-6,
    )


def test_bad_inputs_are_clear_errors(tiny_model):
    config, params = tiny_model
    ids, mask, pix = _batch(config)
    with pytest.raises(ValueError, match="non-increasing"):
        forward_with_recipe(config, params, ids, pix, mask, (5, 9))
    with pytest.raises(ValueError, match="3 layers, the model 2"):
        forward_with_recipe(config, params, ids, pix, mask, (5, 3, 3))
    n = config.num_image_tokens
    ends_with_image = np.array([[1, 2] + [config.image_token_index] * n])
    with pytest.raises(ValueError, match="must end with text"):
        forward_with_recipe(
            config, params, ends_with_image, pix[:1], None, (4,) * config.text.num_hidden_layers
        )


# ---------------------------------------------------------------------------------------------
# Recipe


@pytest.fixture(scope="module")
def fitted(tiny_model):
    config, params = tiny_model
    cal = random_calibration(config, 16, seed=0)
    return cal, {
        r: fit_recipe(config, params, cal, r, flops_scope="prompt", start_layer=0)
        for r in (0.0, 0.3, 0.5)
    }


def test_recipe_is_monotone_and_meets_the_budget(tiny_model, fitted):
    config, _ = tiny_model
    cal, recipes = fitted
    n = config.num_image_tokens
    assert recipes[0.0].keep == (n,) * config.text.num_hidden_layers
    for target in (0.3, 0.5):
        r = recipes[target]
        assert len(r.keep) == config.text.num_hidden_layers
        assert all(a >= b for a, b in zip((n, *r.keep), r.keep)), r.keep
        assert r.keep[-1] >= 1
        assert r.flops_reduction >= target
        assert r.flops_reduction == pytest.approx(
            flops_reduction(config, r.text_tokens, r.images, r.keep)
        )
        assert 0.0 < r.alpha <= 1.0 and r.samples == 16 and r.model == model_signature(config)
    # A bigger reduction needs a larger tolerance and keeps fewer tokens.
    assert recipes[0.5].alpha >= recipes[0.3].alpha
    assert sum(recipes[0.5].keep) <= sum(recipes[0.3].keep)
    # The reference prompt is the calibration batch's mean.
    text = ((cal.attention_mask > 0) & (cal.input_ids != config.image_token_index)).sum(1)
    assert recipes[0.5].text_tokens == round(float(text.mean()))


def test_flops_scope_and_reference_length(tiny_model, fitted):
    config, params = tiny_model
    cal, recipes = fitted
    # FitPrune's accounting: the visual tokens' FLOPs alone (text tokens left out).
    r = fit_recipe(config, params, cal, 0.5, start_layer=0)
    assert r.flops_scope == "visual" and r.flops_reduction >= 0.5
    assert r.flops_reduction == pytest.approx(flops_reduction(config, 0, 1, r.keep))
    # The same budget over the whole prompt (text included) needs more dropping.
    assert sum(recipes[0.5].keep) <= sum(r.keep)
    # A longer deployment prompt: the budget is computed for it.
    r40 = fit_recipe(config, params, cal, 0.3, flops_scope="prompt", text_tokens=12)
    assert r40.text_tokens == 12
    assert flops_reduction(config, 12, 1, r40.keep) == pytest.approx(r40.flops_reduction)
    assert r40.flops_reduction >= 0.3
    with pytest.raises(ValueError, match="flops_scope"):
        fit_recipe(config, params, cal, 0.3, flops_scope="all")


def test_unreachable_budget_is_a_clear_error(tiny_model):
    config, params = tiny_model
    cal = random_calibration(config, 4, seed=1)
    with pytest.raises(ValueError, match="out of reach"):
        fit_recipe(config, params, cal, 0.95)
    with pytest.raises(ValueError, match="start_layer=2"):
        fit_recipe(config, params, cal, 0.3, start_layer=2)


def test_start_layer_is_chosen_by_calibration_divergence(tiny_model):
    """Each start that meets the budget is fitted; the kept one departs least from dense."""
    config, params = tiny_model
    n = config.num_image_tokens
    cal = random_calibration(config, 8, seed=3)
    keep_all_kl, drop_kl = calibration_divergence(config, params, cal, [(n, n), (4, 4)])
    assert keep_all_kl == pytest.approx(0.0, abs=1e-6) and drop_kl > 1e-4
    late = fit_recipe(config, params, cal, 0.3, start_layer=1)
    assert late.keep[0] == n and late.start_layer == 1 and late.flops_reduction >= 0.3
    auto = fit_recipe(config, params, cal, 0.3)
    assert set(auto.divergence) == {"0", "1"}
    assert auto.start_layer == min((0, 1), key=lambda s: (auto.divergence[str(s)], s))
    fixed = fit_recipe(config, params, cal, 0.3, start_layer=auto.start_layer)
    assert fixed.keep == auto.keep and fixed.divergence == {}
    kls = calibration_divergence(config, params, cal, [fixed.keep, late.keep])
    assert auto.divergence[str(auto.start_layer)] == pytest.approx(kls[0], rel=1e-5)


def test_recipe_json_round_trip_and_model_mismatch(tiny_model, fitted, tmp_path):
    config, params = tiny_model
    r = fitted[1][0.5]
    path = tmp_path / "recipe.json"
    r.save(path)
    back = Recipe.load(path, config)
    assert back == r
    d = json.loads(path.read_text())
    assert d["keep"] == list(r.keep) and d["model"]["num_image_tokens"] == 16
    # The loaded recipe applies as the fitted one does.
    ids, mask, pix = _batch(config)
    np.testing.assert_array_equal(
        np.asarray(forward_with_recipe(config, params, ids, pix, mask, back)),
        np.asarray(forward_with_recipe(config, params, ids, pix, mask, r.keep)),
    )
    other = tiny_config(text_intermediate_size=96)
    with pytest.raises(RecipeMismatchError, match="intermediate_size: recipe 128 vs model 96"):
        Recipe.load(path, other)
    with pytest.raises(RecipeMismatchError, match="another model"):
        forward_with_recipe(other, params, ids, pix, mask, back)
    d["format"] = "something-else"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a FitPrune recipe"):
        Recipe.load(path)


# ---------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("keep", [None, (12, 3), (16, 1)])
def test_analytic_flops_equal_a_direct_count(tiny_model, keep):
    """Sum of the dot_general shapes in the pruned prefill's jaxpr == the analytic count."""
    config, params = tiny_model
    n = config.num_image_tokens
    keep_t = (n,) * 2 if keep is None else keep
    for rows in ((1,), (2,)):  # one image; two images with text between
        ids, mask, pix = prompt_batch(config, images_per_row=rows, pad=(0,), seed=2)
        ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
        emb = embed_inputs(config, params, ids_j, jnp.asarray(pix))
        widths = layer_widths(config, keep_t, ids, mask)

        def prefill(e, ids_j=ids_j, mask_j=mask_j, widths=widths):
            return prefill_layers(config, params, e, ids_j, mask_j, keep_t, widths)[0]

        direct = matmul_flops_of_jaxpr(jax.make_jaxpr(prefill)(emb))
        text = ids.shape[1] - rows[0] * n
        assert direct == total_flops(decoder_prefill_flops(config, text, rows[0], keep))


def test_sparse_flops_equal_a_nonzero_count(tiny_model):
    """With sparse kernels, each linear costs 2 x tokens x nonzeros (what a sparse kernel does)."""
    config, params = tiny_model
    rng = np.random.default_rng(0)
    sparse_layers = {}
    for i, p in enumerate(unstack_layers(params)):
        sp = {}
        for group in ("self_attn", "mlp"):
            sp[group] = {}
            for name, w in p[group].items():
                k = np.asarray(w["kernel"])
                s = [0.0, 0.5, 0.7][(int(i) + len(name)) % 3]
                keep_mask = rng.permutation(k.size) >= round(s * k.size)
                sp[group][name] = {"kernel": jnp.asarray(k * keep_mask.reshape(k.shape))}
        sparse_layers[i] = {**p, **sp}
    sparse = with_layers(params, [sparse_layers[i] for i in range(len(sparse_layers))])
    sparsity = sparsity_of_params(config, sparse)
    n_in, n_out = 30, 20
    for i, p in sparse_layers.items():
        got = layer_prefill_flops(config.text, n_in, n_out, sparsity, int(i))
        for group in ("self_attn", "mlp"):
            for name, w in p[group].items():
                n_tok = n_in if name in ("q_proj", "k_proj", "v_proj") else n_out
                assert got[name] == pytest.approx(
                    2 * n_tok * np.count_nonzero(np.asarray(w["kernel"]))
                )
        dense = layer_prefill_flops(config.text, n_in, n_out)
        assert got["scores"] == dense["scores"] and got["values"] == dense["values"]
    assert flops_reduction(config, 10, 1, None, 0.5) > 0.4
    with pytest.raises(ValueError, match="outside"):
        layer_prefill_flops(config.text, 4, sparsity=1.5)


def test_llava_7b_flops_from_config():
    """Sizes come from the config: LLaVA-1.5-7B, 576 visual tokens, 32 layers."""
    from ellava_jax.config import get_preset

    config = get_preset("llava-1.5-7b")
    per_layer = decoder_prefill_flops(config, text_tokens=64, images=1)
    n = 64 + 576
    h, i = 4096, 11008
    expected = 2 * n * (4 * h * h + 3 * h * i) + 4 * n * n * h
    assert len(per_layer) == 32
    assert total_flops(per_layer[:1]) == expected


# ---------------------------------------------------------------------------------------------
# Command


def test_token_prune_command(tmp_path, capsys):
    from ellava_jax.cli import main

    out = tmp_path / "r.json"
    rc = main(
        [
            "token-prune",
            "--model",
            "tiny",
            "--flops-reduction",
            "0.4",
            "--samples",
            "8",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["flops_reduction"] >= 0.4 and summary["recipe_seconds"] > 0
    assert Recipe.load(out).keep == tuple(summary["keep"])
    rc = main(["token-prune", "--model", "tiny", "--flops-reduction", "1.5", "--out", str(out)])
    assert rc == 2


def test_calibration_sources(tmp_path):
    """Toy proxy samples (image + description turns) and a user jsonl of image + text rows."""
    from ellava_jax.app.sources import fitprune_calibration
    from ellava_jax.data import prompt as T
    from ellava_jax.data.records import save_image
    from ellava_jax.toy import scenes
    from ellava_jax.toy import tokenizer as toy_tokenizer

    tok = toy_tokenizer.build_toy_tokenizer()
    toy_tokenizer.save_tokenizer(tok, tmp_path)
    config = tiny_config(
        text_vocab_size=tok.get_vocab_size(),
        image_token_index=T.token_id(tok, T.IMAGE),
        text_pad_token_id=T.token_id(tok, T.PAD),
        vision_image_size=scenes.IMAGE_SIZE,
        vision_patch_size=scenes.PATCH_SIZE,
    )
    n = config.num_image_tokens
    cal = fitprune_calibration(config, str(tmp_path), 4)
    assert cal.input_ids.shape[0] == 4 and cal.pixel_values.shape == (4, 3, 32, 32)
    assert np.all(
        ((cal.input_ids == config.image_token_index) & (cal.attention_mask > 0)).sum(1) == n
    )
    rows = []
    for i in range(3):
        save_image(tmp_path / f"im{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
        rows.append(json.dumps({"image": f"im{i}.png", "text": "Describe the picture."}))
    (tmp_path / "cal.jsonl").write_text("\n".join(rows) + "\n")
    cal = fitprune_calibration(config, str(tmp_path), 8, path=str(tmp_path / "cal.jsonl"))
    assert cal.input_ids.shape[0] == 3 and cal.pixel_values.shape == (3, 3, 32, 32)
    assert np.all((cal.input_ids == config.image_token_index).sum(1) == n)
    other = tiny_config(vision_image_size=64)
    with pytest.raises(ValueError, match="calibration file"):
        fitprune_calibration(other, str(tmp_path), 4)


def test_llava_7b_pruned_prefill_shapes():
    """The pruned prefill at LLaVA-1.5-7B sizes, traced with jax.eval_shape (nothing allocated)."""
    from ellava_jax.config import get_preset
    from ellava_jax.model import param_shapes

    config = get_preset("llava-1.5-7b")
    shapes = param_shapes(config, jnp.bfloat16)
    ids = np.array([[1] * 5 + [config.image_token_index] * 576 + [5] * 40])
    mask = np.ones_like(ids)
    keep = (576, 576, 400, 300) + (200,) * 12 + (100,) * 16
    widths = layer_widths(config, keep, ids, mask)
    assert widths[-1] == 45 + 100

    def prefill(p, e):
        h, _, caches, _ = prefill_layers(
            config, p, e, jnp.asarray(ids), jnp.asarray(mask), keep, widths, extra=8
        )
        return h, caches

    emb = jax.ShapeDtypeStruct((1, ids.shape[1], 4096), jnp.bfloat16)
    h, caches = jax.eval_shape(prefill, shapes, emb)
    assert h.shape == (1, 145, 4096)
    # Layer l's cache holds the tokens that entered it, plus room for the new ones.
    lengths = [c["k"].shape[1] for c in caches]
    assert lengths[:5] == [621 + 8, 621 + 8, 621 + 8, 445 + 8, 345 + 8]
    assert lengths[-1] == 145 + 8

"""Fitting a FitPrune recipe: visual tokens kept per decoder layer for a FLOPs budget.

The method (Ye et al., "Fit and Prune", 2024), in our reading:

1. Dense statistics. On a small calibration batch, for each layer l and each image, every visual
   token v gets two scores from that layer's attention (max over heads):
     cross_l(v) = attention v receives from the prompt's text tokens (summed over them);
     self_l(v)  = attention v receives from its image's visual tokens (mean over them).
   Their sums over the image, C_l and S_l, are the attention mass the image receives.
2. Fit for a tolerance alpha. The pruned model is simulated layer by layer (a dropped token is
   masked out as a key from the next layer on, which is exactly its removal). At layer l, each
   image drops the tokens that are lowest under *both* scores: the longest run of lowest-cross
   tokens whose removal keeps at least (1 - alpha) C_l of the dense mass, intersected with the
   same for self (as FitPrune does); at least one token per image stays. Averaged over the
   calibration images, this is the layer's drop count.
3. Budget. Walking the layers, dropping stops at the first layer where the prefill with no
   further drop already meets the FLOPs budget. A binary search finds the smallest alpha whose
   recipe meets the budget; keep[l] = tokens per image still present after layer l (so it never
   grows over layers).
4. Start layer (our addition). Steps 2-3 are run with dropping allowed from layer 0, 1 and 2
   (FitPrune's own fit starts at 0); of the recipes that meet the budget, the one kept is the
   one whose pruned prefill changes the model's next-token distributions least on the
   calibration batch (mean KL to the dense model at the text positions after the image).
   On the shipped toy (4 layers) this picks layer 1; dropping already at layer 0, as a single
   tolerance does there, cost 3-9 accuracy points against 0 from layer 1 (docs/architecture.md).

FLOPs are the decoder's prefill FLOPs (`ellava_jax.eval.flops`). By default the budget counts
the visual tokens alone (`flops_scope='visual'`), FitPrune's own accounting; with
`flops_scope='prompt'` it counts the whole prefill, text tokens too, of a reference prompt of
the calibration batch's mean text length and image count (or a given text length). The two
are close for LLaVA-1.5 (576 visual tokens, ~60 text), not for a model whose prompts hold as
much text as image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.data import prompt as tokenizer
from ellava_jax.data.images import read_multimodal_jsonl, rows_pixels
from ellava_jax.errors import UserError
from ellava_jax.eval.flops import decoder_prefill_flops, total_flops
from ellava_jax.model.llama import (
    attention_mask_4d,
    layer_params,
    layer_with_attention,
    positions_from_mask,
    rope_cos_sin,
)
from ellava_jax.model.llava import check_image_tokens, embed_inputs
from ellava_jax.model.losses import token_loss_sum
from ellava_jax.tokens.apply import forward_with_recipe, image_layout, rank_in_image
from ellava_jax.tokens.recipe import Recipe, model_signature


def _layer_scores(probs, valid, vis, img, alive):
    """cross (from text queries) and self (mean from alive same-image visual queries), [B, T]."""
    pm = jnp.max(probs.astype(jnp.float32), axis=(1, 2))  # max over heads: [B, Tq, Tk]
    text_q = (valid & ~vis).astype(jnp.float32)
    cross = jnp.sum(pm * text_q[:, :, None], axis=1)
    same = (img[:, :, None] == img[:, None, :]) & (vis & alive)[:, :, None]
    n_q = jnp.maximum(jnp.sum(same, axis=1), 1)
    self_ = jnp.sum(jnp.where(same, pm, 0.0), axis=1) / n_q
    return cross, self_


def _image_sum(x, img, mask, n_groups: int):
    """Per-image sums [B, G] of x [B, T] over the tokens in mask."""
    onehot = (img[:, :, None] == jnp.arange(n_groups)) & mask[:, :, None]
    return jnp.sum(jnp.where(onehot, x[:, :, None], 0.0), axis=1)


def _drop_set(score, allowed, vis_alive, img, n_alive):
    """Tokens of the longest lowest-score run per image whose total is <= the allowed loss."""
    asc = rank_in_image(score, vis_alive, img, descending=False)  # 0 = lowest
    same = (img[:, :, None] == img[:, None, :]) & vis_alive[:, None, :]
    prefix = jnp.sum(
        jnp.where(same & (asc[:, None, :] <= asc[:, :, None]), score[:, None, :], 0.0), 2
    )
    g = jnp.maximum(img, 0)
    my_allowed = jnp.take_along_axis(allowed, g, axis=1)
    my_alive = jnp.take_along_axis(n_alive, g, axis=1)
    return vis_alive & (prefix <= my_allowed) & (asc < my_alive - 1)


@partial(jax.jit, static_argnums=(0, 6))
def _simulate(config, params, embeds, attention_mask, input_ids, alpha, n_groups, dense, start=0):
    """Pruned prefill on the calibration batch for tolerance alpha.

    Layers before `start` drop nothing. Returns per-layer drops [L, B, G] (tokens each image
    drops at that layer) and the dense masses (C, S) [L, B, G] when `dense` is None (then
    nothing is dropped).
    """
    cfg = config.text
    n = config.num_image_tokens
    valid = attention_mask.astype(bool)
    vis = (input_ids == config.image_token_index) & valid
    img = jnp.where(vis, (jnp.cumsum(vis, axis=1) - 1) // n, -1)
    pos = positions_from_mask(attention_mask)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, embeds.dtype)
    alive = valid
    h = embeds
    drops, masses = [], []
    for i in range(cfg.num_hidden_layers):
        mask = attention_mask_4d(alive, h.shape[1], 0)
        layer = layer_params(params, i)
        h, probs = layer_with_attention(cfg, layer, h, cos, sin, mask)
        cross, self_ = _layer_scores(probs, valid, vis, img, alive)
        va = vis & alive
        c_now = _image_sum(cross, img, va, n_groups)
        s_now = _image_sum(self_, img, va, n_groups)
        if dense is None:
            masses.append((c_now, s_now))
            drops.append(jnp.zeros_like(c_now, dtype=jnp.int32))
            continue
        c_dense, s_dense = dense[0][i], dense[1][i]
        n_alive = _image_sum(va.astype(jnp.float32), img, va, n_groups).astype(jnp.int32)
        drop_c = _drop_set(cross, c_now - (1 - alpha) * c_dense, va, img, n_alive)
        drop_s = _drop_set(self_, s_now - (1 - alpha) * s_dense, va, img, n_alive)
        drop = drop_c & drop_s & (i >= start)
        drops.append(_image_sum(drop.astype(jnp.float32), img, drop, n_groups).astype(jnp.int32))
        alive = alive & ~drop
    drops = jnp.stack(drops)
    if dense is None:
        return drops, (jnp.stack([m[0] for m in masses]), jnp.stack([m[1] for m in masses]))
    return drops, None


@dataclass
class Calibration:
    """A calibration batch (concrete arrays) and its image layout."""

    input_ids: np.ndarray  # [B, T]
    attention_mask: np.ndarray  # [B, T]
    pixel_values: np.ndarray  # [B_img, C, S, S]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _chunks(cal: Calibration, config: LlavaConfig, batch_size: int):
    """Yields (input_ids, attention_mask, pixel_values, n_images per row) of at most batch_size rows."""
    images, _ = image_layout(config, cal.input_ids, cal.attention_mask)
    first = np.concatenate([[0], np.cumsum(images)])
    for s in range(0, len(cal), batch_size):
        e = min(s + batch_size, len(cal))
        yield (
            cal.input_ids[s:e],
            cal.attention_mask[s:e],
            cal.pixel_values[first[s] : first[e]],
            images[s:e],
        )


class _Simulator:
    """Holds the calibration embeddings and dense masses; runs the simulation for any alpha."""

    def __init__(self, config, params, cal: Calibration, batch_size: int):
        self.config, self.params = config, params
        self.parts = []
        for ids, mask, pix, images in _chunks(cal, config, batch_size):
            if pix.shape[0]:
                check_image_tokens(config, ids, pix.shape[0])
            embeds = _embed(
                config, params, jnp.asarray(ids), jnp.asarray(pix) if pix.shape[0] else None
            )
            g = max(int(images.max()), 1)
            ids, mask = jnp.asarray(ids), jnp.asarray(mask)
            _, dense = _simulate(config, params, embeds, mask, ids, 0.0, g, None)
            has = jnp.asarray(np.arange(g)[None, :] < images[:, None])  # real images [B, G]
            self.parts.append((embeds, mask, ids, g, dense, has))
        self.n_images = int(sum(int(np.sum(p[5])) for p in self.parts))
        if self.n_images == 0:
            raise UserError("the calibration batch holds no image")

    def mean_drops(self, alpha: float, start: int = 0) -> np.ndarray:
        """Per-layer drop count per image, averaged over the calibration images [L]; layers
        before `start` drop nothing."""
        total = 0.0
        for embeds, mask, ids, g, dense, has in self.parts:
            drops, _ = _simulate(
                self.config,
                self.params,
                embeds,
                mask,
                ids,
                jnp.float32(alpha),
                g,
                dense,
                jnp.int32(start),
            )
            total = total + np.asarray(jnp.sum(jnp.where(has[None], drops, 0), axis=(1, 2)))
        return total / self.n_images


_embed = jax.jit(embed_inputs, static_argnums=0)


def recipe_from_drops(
    config: LlavaConfig, mean_drops, budget: float, text_tokens: int, images: int
) -> tuple[int, ...]:
    """keep[l] from per-layer mean drops, no further drop once the FLOPs budget is met."""
    n_layers, n = config.text.num_hidden_layers, config.num_image_tokens
    keep, cur = [], n
    for layer, d in enumerate(np.asarray(mean_drops)):
        as_is = keep + [cur] * (n_layers - layer)
        if total_flops(decoder_prefill_flops(config, text_tokens, images, as_is)) <= budget:
            return tuple(as_is)
        cur = max(1, cur - int(round(float(d))))
        keep.append(cur)
    return tuple(keep)


def fit_recipe(
    config: LlavaConfig,
    params: dict,
    calibration: Calibration,
    flops_reduction: float,
    *,
    score: str = "text",
    flops_scope: str = "visual",
    text_tokens: int | None = None,
    tol: float = 1 / 256,
    batch_size: int = 8,
    start_layer: int | None = None,
    max_start_layer: int = 2,
) -> Recipe:
    """Fits a FitPrune recipe that cuts the decoder's prefill FLOPs by `flops_reduction`.

    Args:
      config, params: the model (dense or weight-pruned: the statistics are its own).
      calibration: the calibration batch (prompts with images; never an evaluation split).
      flops_reduction: the share of the decoder's prefill FLOPs to remove, in [0, 1).
      score: how `apply` will rank tokens ('text' or 'text_x_visual'); stored in the recipe.
      flops_scope: 'visual' (default): the budget is on the FLOPs of the visual tokens alone,
        FitPrune's own accounting (text tokens left out); 'prompt': on the decoder's whole
        prefill of the reference prompt, text tokens included.
      text_tokens: text tokens of the reference prompt (default: the calibration mean); set it
        to the deployment prompts' length when the calibration text is longer or shorter.
      tol: binary-search precision on alpha.
      batch_size: calibration rows per simulated batch (bounds memory: [B, heads, T, T] probs).
      start_layer: the first layer allowed to drop tokens. None (default) fits one recipe per
        start 0..max_start_layer that can meet the budget and keeps the one whose pruned
        prefill departs least from the dense model on the calibration batch (`divergence`).
        In a shallow model one layer is a large share of the FLOPs, and dropping tokens
        before any layer has mixed the image with the text can cost more than dropping more
        of them later; in LLaVA-1.5 this is FastV's "from layer 2" observation.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise UserError(f"flops_reduction={flops_reduction} must be within [0, 1)")
    t0 = time.perf_counter()
    n_layers = config.text.num_hidden_layers
    if start_layer is not None and not 0 <= start_layer < n_layers:
        raise UserError(f"start_layer={start_layer} must be within [0, {n_layers})")
    budget = _Budget.of(config, calibration, flops_reduction, flops_scope, text_tokens)
    sim = _Simulator(config, params, calibration, batch_size)
    starts = (
        [start_layer] if start_layer is not None else range(min(max_start_layer, n_layers - 1) + 1)
    )
    fits: dict[int, tuple[tuple[int, ...], float]] = {}
    for s in starts:
        try:
            fits[s] = _fit_from(sim, budget, s, tol)
        except _OutOfReach as e:
            if not fits:
                raise UserError(str(e)) from None
            break  # a later start can only save less
    divergence = {}
    if len(fits) > 1:
        divergence = calibration_divergence(
            config, params, calibration, [k for k, _ in fits.values()], score, batch_size
        )
        divergence = dict(zip(fits, divergence))
        chosen = min(fits, key=lambda s: (divergence[s], s))
    else:
        chosen = next(iter(fits))
    keep, alpha = fits[chosen]
    return Recipe(
        keep=keep,
        model=model_signature(config),
        target_reduction=float(flops_reduction),
        flops_reduction=1.0 - budget.flops(keep) / budget.dense,
        alpha=float(alpha),
        text_tokens=budget.ref_text,
        images=budget.images,
        flops_scope=flops_scope,
        samples=len(calibration),
        score=score,
        start_layer=int(chosen),
        divergence={str(s): float(v) for s, v in divergence.items()},
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class _Budget:
    """The FLOPs budget a recipe must meet, for the reference prompt (`fit_recipe`'s Args)."""

    config: LlavaConfig
    ref_text: int  # text tokens of the reference prompt
    text: int  # text tokens the budget counts: ref_text ('prompt' scope) or 0 ('visual')
    images: int
    dense: float  # FLOPs of the dense prefill
    limit: float  # FLOPs allowed
    reduction: float
    scope: str

    @classmethod
    def of(cls, config, calibration, flops_reduction, flops_scope, text_tokens) -> _Budget:
        images, text = image_layout(config, calibration.input_ids, calibration.attention_mask)
        ref_images = max(1, int(round(float(np.mean(images)))))
        if flops_scope not in ("prompt", "visual"):
            raise UserError(f"flops_scope={flops_scope!r} must be 'prompt' or 'visual'")
        ref_text = int(round(float(np.mean(text)))) if text_tokens is None else int(text_tokens)
        if ref_text < 0:
            raise UserError(f"text_tokens={ref_text} must be >= 0")
        budget_text = ref_text if flops_scope == "prompt" else 0
        dense = total_flops(decoder_prefill_flops(config, budget_text, ref_images))
        return cls(
            config,
            ref_text,
            budget_text,
            ref_images,
            dense,
            dense * (1.0 - flops_reduction),
            flops_reduction,
            flops_scope,
        )

    def flops(self, keep) -> float:
        return total_flops(decoder_prefill_flops(self.config, self.text, self.images, keep))


def _fit_from(sim, b: _Budget, start: int, tol: float) -> tuple[tuple[int, ...], float]:
    """(keep, alpha): the smallest tolerance whose recipe, dropping from `start`, meets the
    budget (a binary search to `tol`)."""
    n = b.config.num_image_tokens
    full = (n,) * b.config.text.num_hidden_layers
    cache: dict[float, tuple[int, ...]] = {}

    def recipe_at(alpha: float) -> tuple[int, ...]:
        if alpha not in cache:
            cache[alpha] = recipe_from_drops(
                b.config, sim.mean_drops(alpha, start), b.limit, b.text, b.images
            )
        return cache[alpha]

    if b.flops(full) <= b.limit:
        return full, 0.0
    lo, hi = 0.0, 1.0
    if b.flops(recipe_at(hi)) > b.limit:
        best = 1.0 - b.flops(recipe_at(hi)) / b.dense
        raise _OutOfReach(
            f"a {b.reduction:.0%} prefill FLOPs reduction is out of reach by dropping "
            f"visual tokens from layer {start} on: at most {best:.1%} for prompts of "
            f"{b.text} text tokens and {b.images} image(s) of {n} tokens "
            f"(flops_scope={b.scope!r})"
        )
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if b.flops(recipe_at(mid)) <= b.limit:
            hi = mid
        else:
            lo = mid
    return recipe_at(hi), hi


class _OutOfReach(ValueError):
    """The FLOPs budget cannot be met from a given start layer."""


def calibration_divergence(
    config: LlavaConfig,
    params: dict,
    calibration: Calibration,
    keeps: list[tuple[int, ...]],
    score: str = "text",
    batch_size: int = 8,
) -> list[float]:
    """Mean KL(dense || pruned) of the next-token distributions at the calibration batch's text
    positions after its first image, for each recipe `keeps[i]` applied with `score`."""

    totals, count = np.zeros(len(keeps)), 0
    for ids, mask, pix, _ in _chunks(calibration, config, batch_size):
        pix = jnp.asarray(pix) if pix.shape[0] else None
        vis = ids == config.image_token_index
        after = jnp.asarray((np.cumsum(vis, 1) > 0) & ~vis & (mask > 0), jnp.float32)
        dense = jax.nn.log_softmax(forward_with_recipe(config, params, ids, pix, mask, None), -1)
        for i, keep in enumerate(keeps):
            logits = forward_with_recipe(config, params, ids, pix, mask, keep, score=score)
            totals[i] += float(token_loss_sum(logits, None, after, dense)[0])
        count += int(after.sum())
    return list(totals / max(count, 1))


# ---------------------------------------------------------------------------------------------
# Calibration batches


def pad_left(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded input_ids and attention_mask from token-id lists."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def random_calibration(config: LlavaConfig, n: int = 32, seed: int = 0) -> Calibration:
    """n random prompts, each: text, one image, a longer text (the question) after it."""
    rng = np.random.default_rng(seed)
    v = config.vision
    lo = 3
    hi = min(config.image_token_index, config.text.vocab_size)
    rows = []
    for _ in range(n):
        before = rng.integers(lo, hi, int(rng.integers(1, 4))).tolist()
        after = rng.integers(lo, hi, int(rng.integers(3, 7))).tolist()
        rows.append(before + [config.image_token_index] * config.num_image_tokens + after)
    ids, mask = pad_left(rows, config.text.pad_token_id or 0)
    pix = rng.standard_normal((n, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return Calibration(ids, mask, pix)


def file_calibration(
    config: LlavaConfig, model_dir: str, path: str, n: int = 32, image_root: str | None = None
) -> Calibration:
    """n image + text rows of a jsonl file (`image`: path relative to the file, `text`), as
    LLaVA-1.5 prompts `USER: <image>\n{text} ASSISTANT:` in the model's own tokenizer.

    Images must stay inside the file's directory, or inside `image_root` when given
    (`data.images.read_multimodal_jsonl`); a prompt longer than the model's context is refused."""

    rows = read_multimodal_jsonl(path, image_root, limit=n)
    if not rows:
        raise UserError(f"{path}: no calibration rows")
    tok = tokenizer.load_tokenizer(model_dir)
    ids = []
    context = config.text.max_position_embeddings
    for r in rows:
        where = f"{path}:{r['line']}"
        prompt = tokenizer.expand_image_tokens(
            f"USER: {tokenizer.IMAGE}\n{r['text']} ASSISTANT:", config.num_image_tokens
        )
        row = tokenizer.encode_text(tok, prompt)
        if sum(t == config.image_token_index for t in row) != config.num_image_tokens:
            raise UserError(
                f"{where}: the tokenizer of {model_dir} does not map "
                f"{tokenizer.IMAGE!r} to image_token_index={config.image_token_index}"
            )
        if len(row) > context:
            raise UserError(
                f"{where}: the prompt has {len(row)} tokens ({config.num_image_tokens} image "
                f"tokens included), more than the model's context of {context}"
            )
        ids.append(row)
    pad = config.text.pad_token_id or 0
    input_ids, mask = pad_left(ids, pad)
    pix = rows_pixels(path, rows, model_dir, config)
    return Calibration(input_ids, mask, pix.astype(np.float32))

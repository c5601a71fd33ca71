"""LLaVA-1.5 composed from its towers, each stage exposed as a pure function.

`embed_image` (CLIP + projector), `embed_text`, `merge_image_features`, `decode` (LLaMA + head)
and `forward` (all of them) take `(config, params, ...)`; the pruner, the fitness and FitPrune
each call the stage they need. The parameter tree is described in docs/architecture.md.

A text-only config (`LlavaConfig.text_only`, a plain LLaMA causal LM) runs the same functions
without the image stages: its tree has no `vision_tower` / `multi_modal_projector`, and
`pixel_values` given to it (or `embed_image` called on it) is a `ValueError`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.model.clip import CLIPVisionTransformer, activation
from ellava_jax.model.llama import (
    LlamaModel,
    attention_mask_4d,
    positions_from_mask,
)

_INIT = nn.initializers.normal(0.02)


class Projector(nn.Module):
    """HF `LlavaMultiModalProjector`: linear_1 -> act -> linear_2."""

    cfg: LlavaConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = nn.Dense(
            c.text.hidden_size,
            use_bias=c.multimodal_projector_bias,
            kernel_init=_INIT,
            name="linear_1",
        )(x)
        h = activation(c.projector_hidden_act)(h)
        return nn.Dense(
            c.text.hidden_size,
            use_bias=c.multimodal_projector_bias,
            kernel_init=_INIT,
            name="linear_2",
        )(h)


def init_params(config: LlavaConfig, key, dtype=jnp.float32) -> dict:
    """Random parameters (normal, std 0.02, as HF's initializer_range) in the HF-named tree."""
    return _init_params_jit(config, key, jnp.dtype(dtype))


def _init_params(config: LlavaConfig, key, dtype) -> dict:
    kv, kp, kt, kh = jax.random.split(key, 4)
    v, t = config.vision, config.text
    params = {}
    if v is not None:
        pix = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32)
        vision = CLIPVisionTransformer(v).init(kv, pix)["params"]
        feat_dim = v.hidden_size * len(config.feature_layers)
        proj = Projector(config).init(kp, jnp.zeros((1, 1, feat_dim)))["params"]
        params = {"vision_tower": {"vision_model": vision}, "multi_modal_projector": proj}
    lm = LlamaModel(t).init(kt, jnp.zeros((1, 2), jnp.int32), method=LlamaModel.init_all)["params"]
    params["language_model"] = lm
    if not t.tie_word_embeddings:
        params["lm_head"] = {"kernel": _INIT(kh, (t.hidden_size, t.vocab_size), jnp.float32)}
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


_init_params_jit = jax.jit(_init_params, static_argnums=(0, 2))


def param_shapes(config: LlavaConfig, dtype=jnp.float32):
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda k: _init_params(config, k, jnp.dtype(dtype)), jax.random.key(0))


def refuse_images(config: LlavaConfig, pixel_values, what: str = "pixel_values given") -> None:
    """A `ValueError` when a text-only model is handed images (`pixel_values` not None)."""
    if config.is_text_only and pixel_values is not None:
        raise ValueError(
            f"{what}, but this model is a text-only LLaMA causal LM (no vision tower, no "
            "projector, no image token): it takes input_ids and attention_mask only"
        )


def _feature_layers_needed(config: LlavaConfig) -> int:
    n = config.vision.num_hidden_layers
    return max(layer % (n + 1) for layer in config.feature_layers)


def vision_features(config: LlavaConfig, params: dict, pixel_values) -> jax.Array:
    """CLIP features the projector sees: pixel_values [B_img, C, S, S] -> [B_img, N, D_v * n_layers]."""
    refuse_images(config, pixel_values)
    dtype = params["multi_modal_projector"]["linear_1"]["kernel"].dtype
    tower = CLIPVisionTransformer(config.vision, n_layers=_feature_layers_needed(config))
    hidden = tower.apply(
        {"params": params["vision_tower"]["vision_model"]}, pixel_values.astype(dtype)
    )
    n = config.vision.num_hidden_layers
    feats = [hidden[layer % (n + 1)] for layer in config.feature_layers]
    if config.vision_feature_select_strategy == "default":
        feats = [f[:, 1:] for f in feats]
    return jnp.concatenate(feats, axis=-1) if len(feats) > 1 else feats[0]


def project(config: LlavaConfig, params: dict, features) -> jax.Array:
    """The projector: CLIP features [B_img, N, D_v] -> [B_img, N, H]."""
    refuse_images(config, features, "project() called")
    return Projector(config).apply({"params": params["multi_modal_projector"]}, features)


def embed_image(config: LlavaConfig, params: dict, pixel_values) -> jax.Array:
    """pixel_values [B_img, C, S, S] -> projected image features [B_img, N, H]."""
    return project(config, params, vision_features(config, params, pixel_values))


def embed_text(config: LlavaConfig, params: dict, input_ids) -> jax.Array:
    """input_ids [B, T] -> token embeddings [B, T, H] (image placeholders embed as themselves)."""
    return params["language_model"]["embed_tokens"]["embedding"][input_ids]


def check_image_tokens(config: LlavaConfig, input_ids, n_images: int) -> None:
    """Raises a clear error when the placeholder count does not match the image features.

    A no-op on traced inputs (inside jit the count is not known); `forward` calls it eagerly.
    """
    if isinstance(input_ids, jax.core.Tracer):
        return
    n_tokens = int(np.sum(np.asarray(input_ids) == config.image_token_index))
    expected = n_images * config.num_image_tokens
    if n_tokens != expected:
        raise ValueError(
            f"image placeholder tokens (id {config.image_token_index}) and image features do not "
            f"match: {n_tokens} placeholders in input_ids, but {n_images} image(s) x "
            f"{config.num_image_tokens} features = {expected}"
        )


def merge_image_features(config: LlavaConfig, input_ids, text_embeds, image_features):
    """Replaces placeholder embeddings, in row-major order, by the image features.

    input_ids [B, T]; text_embeds [B, T, H]; image_features [B_img, N, H].
    """
    refuse_images(config, image_features, "image features given")
    b, t, h = text_embeds.shape
    flat_feats = image_features.reshape(-1, h).astype(text_embeds.dtype)
    is_img = (input_ids == config.image_token_index).reshape(-1)
    idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, flat_feats.shape[0] - 1)
    merged = jnp.where(is_img[:, None], flat_feats[idx], text_embeds.reshape(-1, h))
    return merged.reshape(b, t, h)


def lm_head(config: LlavaConfig, params: dict, hidden) -> jax.Array:
    if config.text.tie_word_embeddings:
        return hidden @ params["language_model"]["embed_tokens"]["embedding"].T
    return hidden @ params["lm_head"]["kernel"]


def decode(
    config: LlavaConfig,
    params: dict,
    inputs_embeds,
    attention_mask,
    positions=None,
    caches=None,
    cache_index=0,
    *,
    return_hidden: bool = False,
):
    """LLaMA decoder + head on embeddings.

    Args:
      inputs_embeds: [B, T, H].
      attention_mask: [B, S] key mask; S = T without a cache, the cache length with one.
      positions: [B, T] position ids; by default cumsum(mask) - 1 (left padding).
      caches: per-layer KV caches from `init_cache`, or None.
      cache_index: slot of the first of the T tokens in the cache.

    Returns:
      (logits [B, T, V], caches), or (final hidden [B, T, H], caches) with return_hidden.
    """
    t = inputs_embeds.shape[1]
    if positions is None:
        if caches is not None:
            raise ValueError("decode with a cache needs explicit positions")
        positions = positions_from_mask(attention_mask)
    mask = attention_mask_4d(attention_mask, t, cache_index)
    hidden, caches = LlamaModel(config.text).apply(
        {"params": params["language_model"]}, inputs_embeds, positions, mask, caches, cache_index
    )
    if return_hidden:
        return hidden, caches
    return lm_head(config, params, hidden), caches


def embed_inputs(config: LlavaConfig, params: dict, input_ids, pixel_values=None):
    """Token embeddings with image features merged in: [B, T, H] (text-only: no pixel_values)."""
    refuse_images(config, pixel_values)
    embeds = embed_text(config, params, input_ids)
    if pixel_values is not None:
        feats = embed_image(config, params, pixel_values)
        embeds = merge_image_features(config, input_ids, embeds, feats)
    return embeds


def _forward(config, params, input_ids, pixel_values, attention_mask):
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    embeds = embed_inputs(config, params, input_ids, pixel_values)
    logits, _ = decode(config, params, embeds, attention_mask)
    return logits


_forward_jit = jax.jit(_forward, static_argnums=0)


def forward(config: LlavaConfig, params: dict, input_ids, pixel_values=None, attention_mask=None):
    """Full LLaVA (or text-only LLaMA) forward: logits [B, T, vocab].

    Args:
      config: the model's `LlavaConfig` (static under jit).
      params: the parameter tree.
      input_ids: [B, T] int, with `num_image_tokens` placeholders per image.
      pixel_values: [B_img, C, S, S] float (NCHW), or None for text only (always None for a
        text-only config; anything else is a ValueError).
      attention_mask: [B, T] (1 = token, 0 = left padding), or None.

    Eager calls check the placeholder count and run jit-compiled; the function can also be
    wrapped in `jax.jit(forward, static_argnums=0)`.
    """
    refuse_images(config, pixel_values)
    if pixel_values is not None:
        check_image_tokens(config, input_ids, pixel_values.shape[0])
    if isinstance(input_ids, jax.core.Tracer):
        return _forward(config, params, input_ids, pixel_values, attention_mask)
    return _forward_jit(config, params, jnp.asarray(input_ids), pixel_values, attention_mask)

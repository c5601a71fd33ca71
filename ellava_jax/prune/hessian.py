"""Calibration: per-layer input Gram matrices H = (2/n) X^T X of the decoder's linear weights.

The LLaMA decoder runs one layer at a time over the proxy samples. For each layer, the inputs
of its linears are captured (they are `sow`n by the model) and accumulated, padding excluded,
as a running mean over samples, SparseGPT's convention: n counts sequences, X stacks their
tokens. q/k/v share one H (`attn_in`), gate/up share one (`mlp_in`); o_proj (`o_in`) and
down_proj (`down_in`) have their own.

Two modes:
  sequential  layer l is calibrated on the outputs of the already-pruned layers 0..l-1, and the
              caller's `on_layer` prunes layer l before its outputs feed layer l+1 (SparseGPT);
  dense       every H comes from the unpruned model (the level database of the search).
Hessians are handed to `on_layer` one layer at a time and never all kept: a 7B model's
would take 22 GB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ellava_jax.config import LlavaConfig, TextConfig
from ellava_jax.model.llama import (
    LlamaDecoderLayer,
    attention_mask_4d,
    layer_params,
    positions_from_mask,
    rope_cos_sin,
    with_layers,
)
from ellava_jax.model.llava import embed_inputs

# Which captured input feeds which matrices.
GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}
MATRIX_GROUP = {m: g for g, ms in GROUPS.items() for m in ms}
# Where each group's input is sown inside a decoder layer's `intermediates`.
_SOWN = {
    "attn_in": ("attn_in",),
    "o_in": ("self_attn", "o_in"),
    "mlp_in": ("mlp_in",),
    "down_in": ("mlp", "down_in"),
}


def left_pad(a: np.ndarray, t: int, value=0) -> np.ndarray:
    """Pads axis 1 of `a` on the left to length t (rows of tokens, masks or embeddings)."""
    pad = [(0, 0), (t - a.shape[1], 0)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, constant_values=value)


@dataclass(frozen=True)
class CalibrationSet:
    """Decoder inputs of the proxy samples: embeddings (images merged in) and padding mask."""

    inputs_embeds: jax.Array  # [N, T, H]
    attention_mask: jax.Array  # [N, T], 1 = token, 0 = padding

    @property
    def n_samples(self) -> int:
        return int(self.inputs_embeds.shape[0])


def build_calibration_set(
    config: LlavaConfig, params: dict, batches, batch_size: int = 8
) -> CalibrationSet:
    """Embeds proxy batches (images merged through the vision tower and projector).

    Args:
      batches: iterable of (input_ids [n, t], attention_mask [n, t], pixel_values or None);
        text-only segments and image+text samples may have different lengths: rows are
        left-padded to the longest.
    """
    embeds, masks = [], []
    for ids, mask, pix in batches:
        ids, mask = np.asarray(ids), np.asarray(mask)
        for s in range(0, ids.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            p = None
            if pix is not None:
                # images belong to rows in order; find which images these rows hold
                per_row = (ids == config.image_token_index).sum(1) // config.num_image_tokens
                first = int(per_row[:s].sum())
                p = jnp.asarray(pix[first : first + int(per_row[sl].sum())])
                if p.shape[0] == 0:
                    p = None
            embeds.append(np.asarray(_embed(config, params, jnp.asarray(ids[sl]), p)))
            masks.append(mask[sl])
    t = max(e.shape[1] for e in embeds)
    embeds = np.concatenate([left_pad(e, t) for e in embeds])
    return CalibrationSet(
        jnp.asarray(embeds), jnp.asarray(np.concatenate([left_pad(m, t) for m in masks]))
    )


@partial(jax.jit, static_argnums=0)
def _embed(config, params, ids, pix):
    return embed_inputs(config, params, ids, pix)


@partial(jax.jit, static_argnums=(0, 5))
def _layer_stats(cfg: TextConfig, layer_params, h, mask, positions, capture: bool):
    """One decoder layer on a chunk: (outputs, {group: sum over real tokens of x x^T})."""
    t = h.shape[1]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
    m4 = attention_mask_4d(mask, t)
    layer = LlamaDecoderLayer(cfg)
    if not capture:
        out, _ = layer.apply({"params": layer_params}, h, cos, sin, m4)
        return out, {}
    (out, _), state = layer.apply(
        {"params": layer_params}, h, cos, sin, m4, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    w = mask.astype(jnp.float32)[..., None]
    grams = {}
    for g in GROUPS:
        x = inter
        for k in _SOWN[g]:
            x = x[k]
        x = x[0].astype(jnp.float32)
        grams[g] = jnp.einsum("btd,bte->de", x * w, x, precision=jax.lax.Precision.HIGHEST)
    return out, grams


def layer_hessians(cfg: TextConfig, layer_params, calib_h, mask, positions, batch_size: int):
    """Hessians of one layer over all samples (running mean over chunks), and its outputs."""
    n = calib_h.shape[0]
    hess = None
    seen = 0
    outs = []
    for s in range(0, n, batch_size):
        hc, mc, pc = (
            calib_h[s : s + batch_size],
            mask[s : s + batch_size],
            positions[s : s + batch_size],
        )
        b = int(jnp.sum(jnp.any(mc > 0, axis=1)))  # sequences with at least one token
        out, grams = _layer_stats(cfg, layer_params, hc, mc, pc, True)
        outs.append(out)
        if b == 0:
            continue
        if hess is None:
            hess = {g: jnp.zeros_like(v) for g, v in grams.items()}
        # H <- H * seen / (seen + b) + (2 / (seen + b)) * sum_b X^T X
        hess = {g: hess[g] * (seen / (seen + b)) + grams[g] * (2.0 / (seen + b)) for g in hess}
        seen += b
    return hess, jnp.concatenate(outs)


def layer_outputs(cfg: TextConfig, layer_params, calib_h, mask, positions, batch_size: int):
    outs = []
    for s in range(0, calib_h.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        out, _ = _layer_stats(cfg, layer_params, calib_h[sl], mask[sl], positions[sl], False)
        outs.append(out)
    return jnp.concatenate(outs)


OnLayer = Callable[[int, dict, dict[str, jax.Array]], dict | None]


def calibrate(
    config: LlavaConfig,
    params: dict,
    calib: CalibrationSet,
    on_layer: OnLayer,
    *,
    mode: str = "sequential",
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Runs the decoder layer by layer and hands each layer's Hessians to `on_layer`.

    Args:
      on_layer: `on_layer(layer_index, layer_params, hessians) -> new_layer_params | None`.
        `hessians` maps "attn_in" / "o_in" / "mlp_in" / "down_in" to H. In sequential mode the
        returned (pruned) parameters produce the inputs of the next layer; returning None keeps
        the layer as it is.
      mode: "sequential" or "dense" (see the module docstring).

    Returns:
      params with every layer replaced by what `on_layer` returned.
    """
    if mode not in ("sequential", "dense"):
        raise ValueError(f"calibration mode {mode!r}: expected 'sequential' or 'dense'")
    cfg = config.text
    h = calib.inputs_embeds.astype(params["language_model"]["embed_tokens"]["embedding"].dtype)
    mask = calib.attention_mask
    positions = positions_from_mask(mask)
    n = cfg.num_hidden_layers
    new_layers: dict[int, dict] = {}  # each layer is sliced out when reached, not all at once
    bar = tqdm(range(n), desc=f"calibrate ({mode})", disable=not progress, unit="layer")
    for i in bar:
        lp = layer_params(params, i)
        hess, dense_out = layer_hessians(cfg, lp, h, mask, positions, batch_size)
        new = on_layer(i, lp, hess)
        if new is not None:
            new_layers[i] = new
        if mode == "sequential" and new is not None:
            h = layer_outputs(cfg, new, h, mask, positions, batch_size)
        else:
            h = dense_out
        del hess, lp
    if not new_layers:
        return params
    return with_layers(
        params, [new_layers[i] if i in new_layers else layer_params(params, i) for i in range(n)]
    )

"""Analytic prefill FLOPs of the LLaMA decoder: dense, with dropped visual tokens, with sparse weights.

One multiply-add is 2 FLOPs. Counted per decoder layer, as the Flax model computes it:

    q_proj, k_proj, v_proj   2 * n_in * H * (heads * hd)   (k, v with the key/value heads)
    scores (q k^T)           2 * n_in * n_in * heads * hd   the full [T, S] block, as computed
    values (p v)             2 * n_in * n_in * heads * hd   (the causal mask does not skip work)
    o_proj                   2 * n_out * (heads * hd) * H
    gate_proj, up_proj       2 * n_out * H * I each
    down_proj                2 * n_out * I * H

`n_in` is the number of tokens entering the layer, `n_out` the number that leaves it: FitPrune
drops a layer's visual tokens after that layer's attention (the attention is what ranks them),
so o_proj and the MLP of layer l already run on the reduced sequence. Norms, RoPE, softmax and
residual adds are elementwise and left out (they are O(n * H), not O(n * H^2)).

Weight sparsity scales each linear's count by its density (1 - sparsity): the FLOPs a sparse
kernel (DeepSparse, N:M hardware) can skip. Attention scores/values have no weights and keep
their dense count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ellava_jax.config import LlavaConfig, TextConfig
from ellava_jax.prune.masks import MATRICES, get_kernel

LINEARS = tuple(m.split(".")[1] for m in MATRICES)  # q_proj ... down_proj
PARTS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "scores",
    "values",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# sparsity: None (dense), one float for every linear, or {layer: {matrix name: sparsity}}
# (a layer or matrix that is missing is dense).
Sparsity = float | Mapping[int, Mapping[str, float]] | None


def _matrix_sparsity(sparsity: Sparsity, layer: int, name: str) -> float:
    if sparsity is None:
        return 0.0
    if isinstance(sparsity, int | float):
        s = float(sparsity)
    else:
        per_layer = sparsity.get(layer, sparsity.get(str(layer), {}))
        s = float(per_layer.get(name, 0.0))
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity of layer {layer} {name} is {s}, outside [0, 1]")
    return s


def layer_prefill_flops(
    cfg: TextConfig, n_in: int, n_out: int | None = None, sparsity: Sparsity = None, layer: int = 0
) -> dict[str, float]:
    """FLOPs of one decoder layer's prefill, by part (see the module docstring).

    Args:
      cfg: the decoder's config.
      n_in: tokens entering the layer (they all go through q/k/v and attention).
      n_out: tokens leaving it (o_proj and MLP); n_in by default (no token dropped here).
      sparsity: weight sparsity (see `Sparsity`); `layer` picks the entry of a per-layer mapping.
    """
    n_out = n_in if n_out is None else n_out
    if not 0 <= n_out <= n_in:
        raise ValueError(f"layer {layer}: n_out={n_out} must be within [0, n_in={n_in}]")
    h, i = cfg.hidden_size, cfg.intermediate_size
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    dense = {
        "q_proj": 2 * n_in * h * q_dim,
        "k_proj": 2 * n_in * h * kv_dim,
        "v_proj": 2 * n_in * h * kv_dim,
        "scores": 2 * n_in * n_in * q_dim,
        "values": 2 * n_in * n_in * q_dim,
        "o_proj": 2 * n_out * q_dim * h,
        "gate_proj": 2 * n_out * h * i,
        "up_proj": 2 * n_out * h * i,
        "down_proj": 2 * n_out * i * h,
    }
    return {
        k: float(v) * (1.0 - _matrix_sparsity(sparsity, layer, k)) if k in LINEARS else float(v)
        for k, v in dense.items()
    }


def token_counts(
    config: LlavaConfig, text_tokens: int, images: int, keep: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """(n_in, n_out) per decoder layer for a prompt of `text_tokens` + `images` images.

    keep: visual tokens kept per image after each layer (a FitPrune recipe); None keeps all.
    """
    n_layers, n_img = config.text.num_hidden_layers, config.num_image_tokens
    keep = [n_img] * n_layers if keep is None else list(keep)
    if len(keep) != n_layers:
        raise ValueError(f"keep has {len(keep)} entries for {n_layers} decoder layers")
    out, prev = [], n_img
    for k in keep:
        out.append((text_tokens + images * prev, text_tokens + images * k))
        prev = k
    return out


def decoder_prefill_flops(
    config: LlavaConfig,
    text_tokens: int,
    images: int = 1,
    keep: Sequence[int] | None = None,
    sparsity: Sparsity = None,
) -> list[dict[str, float]]:
    """Per-layer prefill FLOPs (by part) of the decoder for one prompt.

    Args:
      config: the model.
      text_tokens: non-image tokens of the prompt.
      images: images in the prompt (each `config.num_image_tokens` visual tokens).
      keep: visual tokens kept per image after each layer (None: all).
      sparsity: weight sparsity (`Sparsity`).
    """
    return [
        layer_prefill_flops(config.text, n_in, n_out, sparsity, layer)
        for layer, (n_in, n_out) in enumerate(token_counts(config, text_tokens, images, keep))
    ]


def total_flops(per_layer: list[dict[str, float]]) -> float:
    return float(sum(sum(d.values()) for d in per_layer))


def flops_reduction(
    config: LlavaConfig,
    text_tokens: int,
    images: int = 1,
    keep: Sequence[int] | None = None,
    sparsity: Sparsity = None,
) -> float:
    """1 - FLOPs(keep, sparsity) / FLOPs(dense, all tokens) for the decoder prefill."""
    dense = total_flops(decoder_prefill_flops(config, text_tokens, images))
    pruned = total_flops(decoder_prefill_flops(config, text_tokens, images, keep, sparsity))
    return 1.0 - pruned / dense


def sparsity_of_params(config: LlavaConfig, params: dict) -> dict[int, dict[str, float]]:
    """Measured sparsity (share of exact zeros) of every decoder linear kernel in a parameter tree."""
    out: dict[int, dict[str, float]] = {}
    for layer in range(config.text.num_hidden_layers):
        out[layer] = {}
        for m in MATRICES:
            w = get_kernel(params, layer, m)
            out[layer][m.split(".")[1]] = float(np.mean(np.asarray(w) == 0))
    return out


def by_layer(per_matrix) -> dict[int, dict[str, float]]:
    """`prune.masks.policy_to_sparsities`' {(layer, "self_attn.q_proj"): s} as the
    {layer: {"q_proj": s}} this module reads."""
    out: dict[int, dict[str, float]] = {}
    for (layer, m), s in per_matrix.items():
        out.setdefault(layer, {})[m.split(".")[1]] = float(s)
    return out


def matmul_flops_of_jaxpr(jaxpr) -> float:
    """2 x multiply-adds of every dot_general in a (closed) jaxpr, sub-jaxprs included.

    A direct count to check the analytic model against (`jax.make_jaxpr(f)(*args)`); loops are
    not unrolled (a scan or while body counts once).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in lhs_contract]))
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += matmul_flops_of_jaxpr(sub)
    return total

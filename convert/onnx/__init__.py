"""Flax param tree -> ONNX graphs for CPU runtimes (onnxruntime, DeepSparse 1.8).

Graphs are built with ``onnx.helper`` directly from the parameter tree described in
``docs/architecture.md`` (kernels ``[in, out]``), with numpy initializers, so a masked weight's
zeros stay exact zeros and the runtime sees the sparsity. Every linear layer is a ``MatMul``
whose right-hand side is a constant initializer in ``[in, out]`` layout: the form DeepSparse's
sparse kernels pick up. Default opset 14, IR version 8 (DeepSparse 1.8 reads opset <= 17, IR <= 8).

Three graphs, one module each beside the builder (a text-only LLaMA, ``LlamaForCausalLM``, gets
the first two, from ``input_ids``):

* :func:`export_decoder_prefill` (``decoder.py``): LLaMA decoder over a sequence. Inputs
  ``inputs_embeds`` ``[B, T, H]`` (or ``input_ids`` ``[B, T]``) and ``attention_mask`` ``[B, T]``
  (1 = token, 0 = left padding). Outputs ``logits`` ``[B, T, V]`` (or ``last_hidden_state`` with
  ``head=False``) and ``present.<i>.key`` / ``present.<i>.value`` ``[B, KVH, T, D]`` per layer
  (after RoPE, as HF caches them).
* :func:`export_decoder_decode` (``decoder.py``): one new token with the cache. Inputs
  ``inputs_embeds`` ``[B, 1, H]`` (or ``input_ids`` ``[B, 1]``), ``attention_mask`` ``[B, P + 1]``
  (past and the new token) and ``past_key_values.<i>.key`` / ``.value`` ``[B, KVH, P, D]``;
  outputs ``logits`` ``[B, 1, V]`` and ``present.<i>.*`` ``[B, KVH, P + 1, D]``. P is dynamic.
* :func:`export_llava_prefill` (``llava.py``): CLIP vision tower + projector + merge of image
  features at ``image_token_index`` positions + the decoder prefill. Inputs ``input_ids``,
  ``pixel_values`` ``[B_img, C, S, S]`` and ``attention_mask``.

``_graph.py`` holds the builder (``_Graph``), the dims read from the config and
:func:`save_model`; :func:`export_all` (here) writes the three files, and ``python -m
convert.onnx --model DIR --out OUT`` (``__main__.py``) exports an HF LLaVA directory.

Semantics follow HF LLaMA / LLaVA: RMSNorm ``x * rsqrt(mean(x^2) + eps) * scale``; RoPE with
``rotate_half`` on the full head dim and ``rope_theta``; positions ``cumsum(mask) - 1`` (left
padding); grouped-query attention; SwiGLU with silu; tied embeddings use ``embed_tokens^T``.

DeepSparse 1.8 compiles a graph into its own kernels only where it supports every op; the
rest runs in its bundled onnxruntime ("NM Execution Provider supports N% of the network" in
its diagnose log, ``NM_LOGGING_LEVEL=diagnose``). The decoder graphs here are 100% in its
kernels, as one subgraph, because: RMSNorm divides by ``Sqrt`` (no ``Reciprocal`` kernel);
positions and masks are computed in float (its reductions take floats), with
``cumsum(mask)`` as ``mask @ tri`` and the causal mask from a constant ``arange`` sliced to
the input length (no ``CumSum`` / ``Range``); GELU is in the op order torch exports (its
``Erf`` runs only in that pattern). In the LLaVA graph only the integer merge of image
features (no weights) runs outside its kernels.

The config is duck-typed: a ``LlavaConfig`` (``.text`` / ``.vision``) or a text config alone,
with HF attribute names (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
``rms_norm_eps``, ``rope_theta``, ``tie_word_embeddings``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from convert.onnx._graph import (
    DEFAULT_OPSET,
    IR_VERSION,
    MASK_VALUE,
    MAX_IR_VERSION,
    MAX_OPSET,
    rope_tables,
    save_model,
    text_config,
)
from convert.onnx.decoder import export_decoder_decode, export_decoder_prefill
from convert.onnx.llava import export_llava_prefill

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "MASK_VALUE",
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "export_all",
    "export_decoder_decode",
    "export_decoder_prefill",
    "export_llava_prefill",
    "rope_tables",
    "save_model",
    "text_config",
]


def export_all(
    config: Any,
    params: Mapping,
    out_dir: str | os.PathLike,
    *,
    head: bool = True,
    inputs: str | None = None,
) -> dict[str, str]:
    """Write decoder_prefill.onnx, decoder_decode.onnx and, when the config and params have a
    vision part, llava_prefill.onnx. Returns {graph name: path}.

    ``inputs``: what the decoder graphs take, ``"embeds"`` (``inputs_embeds``) or ``"ids"``
    (``input_ids``); default ``"ids"`` for a text-only LLaMA (``config.is_text_only``: nothing
    else would embed its tokens), else ``"embeds"``."""
    out_dir = os.fspath(out_dir)
    if inputs is None:
        inputs = "ids" if getattr(config, "is_text_only", False) else "embeds"
    paths = {
        "decoder_prefill": os.path.join(out_dir, "decoder_prefill.onnx"),
        "decoder_decode": os.path.join(out_dir, "decoder_decode.onnx"),
    }
    export_decoder_prefill(config, params, paths["decoder_prefill"], inputs=inputs, head=head)
    export_decoder_decode(config, params, paths["decoder_decode"], inputs=inputs, head=head)
    has_vision = (
        getattr(config, "vision", None) or getattr(config, "vision_config", None)
    ) is not None and "vision_tower" in params
    if has_vision:
        paths["llava_prefill"] = os.path.join(out_dir, "llava_prefill.onnx")
        export_llava_prefill(config, params, paths["llava_prefill"], head=head)
    return paths

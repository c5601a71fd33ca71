"""The LLaMA decoder as ONNX: the prefill over a sequence and the one-token decode step.

Shared with :mod:`convert.onnx.llava`: the decoder layers, the embedding lookup, the head and
:func:`prefill_body` (positions, masks, layers, final norm and head for a prefill). Masks and
positions are computed in float, without ``CumSum`` / ``Range``, so that DeepSparse 1.8 runs the
whole decoder in its own kernels (see :mod:`convert.onnx`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from convert.onnx._graph import (
    DEFAULT_OPSET,
    MASK_VALUE,
    _Dims,
    _Graph,
    _language_model,
    _np,
    rope_tables,
    save_model,
    text_config,
)


def embed_tokens(g: _Graph, lm: Mapping, ids: str) -> str:
    table = g.init("language_model.embed_tokens.embedding", _np(lm["embed_tokens"]["embedding"]))
    return g.op("Gather", table, ids, axis=0)


def _head(g: _Graph, params: Mapping, lm: Mapping, d: _Dims, h: str) -> str:
    if "lm_head" in params and not d.tied:
        w = g.init("lm_head.kernel", _np(params["lm_head"]["kernel"]))
    else:
        # tied: logits = h @ embed_tokens^T; stored once more as an [H, V] constant so the
        # MatMul keeps the [in, out] right-hand-side form
        w = g.init("lm_head.kernel", np.ascontiguousarray(_np(lm["embed_tokens"]["embedding"]).T))
    return g.op("MatMul", h, w, name="logits")


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x [B, T, heads, D]; cos/sin [B, T, 1, D]: x * cos + rotate_half(x) * sin."""
    x1 = g.op("Slice", x, g.const([0]), g.const([half]), g.const([3]))
    x2 = g.op("Slice", x, g.const([half]), g.const([2 * half]), g.const([3]))
    rot = g.op("Concat", g.op("Neg", x2), x1, axis=3)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))


def _repeat_kv(g: _Graph, x: str, d: _Dims) -> str:
    """[B, KVH, S, D] -> [B, H, S, D] (each kv head repeated n_rep times, as HF repeat_kv)."""
    if d.n_rep == 1:
        return x
    x = g.op("Unsqueeze", x, g.const([2]))
    x = g.op("Expand", x, g.const([1, 1, d.n_rep, 1, 1]))
    return g.op("Reshape", x, g.const([0, d.n_heads, -1, d.head_dim]))


def _layer(stack: Mapping, i: int) -> dict:
    """Layer i's tree out of the stacked decoder layers (every leaf [L, ...])."""
    return {
        k: _layer(v, i) if isinstance(v, Mapping) else np.asarray(v[i]) for k, v in stack.items()
    }


def _decoder_layers(
    g: _Graph,
    lm: Mapping,
    d: _Dims,
    h: str,
    cos: str,
    sin: str,
    mask_add: str,
    past: list[tuple[str, str]] | None,
    present_shape: list,
) -> str:
    scale = g.const(1.0 / np.sqrt(d.head_dim), np.float32)
    half = d.head_dim // 2
    for i in range(d.n_layers):
        p = _layer(lm["layers"], i)
        pre = f"language_model.layers.{i}"
        x = g.rms_norm(h, pre + ".input_layernorm", p["input_layernorm"]["scale"], d.eps)
        att = p["self_attn"]
        q = g.linear(x, pre + ".self_attn.q_proj", att["q_proj"])
        k = g.linear(x, pre + ".self_attn.k_proj", att["k_proj"])
        v = g.linear(x, pre + ".self_attn.v_proj", att["v_proj"])
        q = g.op("Reshape", q, g.const([0, 0, d.n_heads, d.head_dim]))
        k = g.op("Reshape", k, g.const([0, 0, d.n_kv, d.head_dim]))
        v = g.op("Reshape", v, g.const([0, 0, d.n_kv, d.head_dim]))
        q = _rope(g, q, cos, sin, half)
        k = _rope(g, k, cos, sin, half)
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [B, H, T, D]
        k = g.op("Transpose", k, perm=[0, 2, 1, 3])  # [B, KVH, T, D]
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        if past is not None:
            pk, pv = past[i]
            k = g.op("Concat", pk, k, axis=2)
            v = g.op("Concat", pv, v, axis=2)
        g.op("Identity", k, name=f"present.{i}.key")
        g.op("Identity", v, name=f"present.{i}.value")
        g.add_output(f"present.{i}.key", TensorProto.FLOAT, present_shape)
        g.add_output(f"present.{i}.value", TensorProto.FLOAT, present_shape)
        kr = _repeat_kv(g, k, d)
        vr = _repeat_kv(g, v, d)
        kt = g.op("Transpose", kr, perm=[0, 1, 3, 2])  # [B, H, D, S]
        s = g.op("Mul", g.op("MatMul", q, kt), scale)
        s = g.op("Add", s, mask_add)
        a = g.op("Softmax", s, axis=-1)
        o = g.op("MatMul", a, vr)  # [B, H, T, D]
        o = g.op("Transpose", o, perm=[0, 2, 1, 3])
        o = g.op("Reshape", o, g.const([0, 0, d.n_heads * d.head_dim]))
        o = g.linear(o, pre + ".self_attn.o_proj", att["o_proj"])
        h = g.op("Add", h, o)

        x = g.rms_norm(
            h, pre + ".post_attention_layernorm", p["post_attention_layernorm"]["scale"], d.eps
        )
        mlp = p["mlp"]
        gate = g.linear(x, pre + ".mlp.gate_proj", mlp["gate_proj"])
        up = g.linear(x, pre + ".mlp.up_proj", mlp["up_proj"])
        act = g.op("Mul", g.activation(gate, "silu"), up)
        h = g.op("Add", h, g.linear(act, pre + ".mlp.down_proj", mlp["down_proj"]))
    return h


def _rope_inputs(g: _Graph, d: _Dims, pos: str) -> tuple[str, str]:
    """positions [B, T] int64 -> cos, sin [B, T, 1, D] gathered from constant tables."""
    cos_t, sin_t = rope_tables(d.head_dim, d.theta, d.max_pos)
    cos = g.op("Gather", g.init("rope.cos", cos_t), pos, axis=0)
    sin = g.op("Gather", g.init("rope.sin", sin_t), pos, axis=0)
    return g.op("Unsqueeze", cos, g.const([2])), g.op("Unsqueeze", sin, g.const([2]))


def _padding_add(g: _Graph, mask: str) -> str:
    """attention_mask [B, S] (1 keep, 0 pad) -> additive [B, 1, 1, S]."""
    m = g.op("Cast", mask, to=TensorProto.FLOAT)
    m = g.op("Mul", g.op("Sub", g.const(1.0, np.float32), m), g.const(MASK_VALUE, np.float32))
    return g.op("Unsqueeze", m, g.const([1, 2]))


def _le_matrix(g: _Graph, d: _Dims, n: str) -> str:
    """tri[j, i] = [j <= i] for j, i < n (n a [1] int64 tensor from a Shape; folded at compile
    time): 1 - min(relu(j - i), 1), built from a constant arange, no Range / CumSum."""
    ar = g.op(
        "Slice",
        g.init("arange", np.arange(d.max_pos, dtype=np.float32)),
        g.const([0]),
        n,
        g.const([0]),
    )
    row = g.op("Unsqueeze", ar, g.const([1]))  # [n, 1]
    col = g.op("Unsqueeze", ar, g.const([0]))  # [1, n]
    tri = g.op("Min", g.op("Relu", g.op("Sub", row, col)), g.const(1.0, np.float32))
    return g.op("Sub", g.const(1.0, np.float32), tri)


def prefill_body(g: _Graph, params: Mapping, d: _Dims, h: str, mask: str, head: bool) -> None:
    lm = _language_model(params)
    # DeepSparse runs neither CumSum nor Range (nor integer arithmetic) in its own kernels, so
    # positions = mask @ tri - 1 = cumsum(mask) - 1 (clipped at 0), tri[j, i] = [j <= i]
    tri = _le_matrix(g, d, g.op("Gather", g.op("Shape", mask), g.const([1]), axis=0))  # [T, T]
    pos = g.op("MatMul", g.op("Cast", mask, to=TensorProto.FLOAT), tri)
    pos = g.op("Max", g.op("Sub", pos, g.const(1.0, np.float32)), g.const(0.0, np.float32))
    cos, sin = _rope_inputs(g, d, g.op("Cast", pos, to=TensorProto.INT64))
    # causal: query i must not see key j > i: future[i, j] = 1 - tri[j, i]
    future = g.op("Sub", g.const(1.0, np.float32), g.op("Transpose", tri, perm=[1, 0]))
    causal = g.op("Mul", future, g.const(MASK_VALUE, np.float32))  # [T, T]
    mask_add = g.op("Add", _padding_add(g, mask), causal)  # [B, 1, T, T]
    h = _decoder_layers(g, lm, d, h, cos, sin, mask_add, None, ["batch", d.n_kv, "seq", d.head_dim])
    _finish(g, params, lm, d, h, head, ["batch", "seq"])


def _finish(
    g: _Graph, params: Mapping, lm: Mapping, d: _Dims, h: str, head: bool, bt: list
) -> None:
    h = g.rms_norm(h, "language_model.norm", lm["norm"]["scale"], d.eps)
    if head:
        _head(g, params, lm, d, h)
        g.add_output("logits", TensorProto.FLOAT, [*bt, d.vocab])
    else:
        g.op("Identity", h, name="last_hidden_state")
        g.add_output("last_hidden_state", TensorProto.FLOAT, [*bt, d.hidden])


def _token_input(g: _Graph, params: Mapping, d: _Dims, inputs: str, seq) -> str:
    """The graph's token input, [batch, seq, hidden]: `inputs_embeds` ("embeds"), or
    `input_ids` ("ids") looked up in the embedding table."""
    if inputs == "embeds":
        return g.add_input("inputs_embeds", TensorProto.FLOAT, ["batch", seq, d.hidden])
    if inputs == "ids":
        ids = g.add_input("input_ids", TensorProto.INT64, ["batch", seq])
        return embed_tokens(g, _language_model(params), ids)
    raise ValueError("inputs must be 'embeds' (inputs_embeds) or 'ids' (input_ids)")


def export_decoder_prefill(
    config: Any,
    params: Mapping,
    path: str | os.PathLike | None = None,
    *,
    inputs: str = "embeds",
    head: bool = True,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """LLaMA decoder prefill graph (see :mod:`convert.onnx`); saved to ``path`` when given."""
    d = _Dims(text_config(config))
    g = _Graph()
    h = _token_input(g, params, d, inputs, "seq")
    mask = g.add_input("attention_mask", TensorProto.INT64, ["batch", "seq"])
    prefill_body(g, params, d, h, mask, head)
    model = g.model("llama_prefill", opset)
    if path is not None:
        save_model(model, path)
    return model


def export_decoder_decode(
    config: Any,
    params: Mapping,
    path: str | os.PathLike | None = None,
    *,
    inputs: str = "embeds",
    head: bool = True,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """One-token decode step with the KV cache as inputs and outputs (past length dynamic)."""
    d = _Dims(text_config(config))
    g = _Graph()
    lm = _language_model(params)
    h = _token_input(g, params, d, inputs, 1)
    mask = g.add_input("attention_mask", TensorProto.INT64, ["batch", "total"])
    past = []
    for i in range(d.n_layers):
        shape = ["batch", d.n_kv, "past", d.head_dim]
        past.append(
            (
                g.add_input(f"past_key_values.{i}.key", TensorProto.FLOAT, shape),
                g.add_input(f"past_key_values.{i}.value", TensorProto.FLOAT, shape),
            )
        )
    # position of the new token = (number of real tokens, itself included) - 1
    # (float arithmetic: DeepSparse reduces only floats)
    pos = g.op("ReduceSum", g.op("Cast", mask, to=TensorProto.FLOAT), g.const([1]), keepdims=1)
    pos = g.op("Max", g.op("Sub", pos, g.const(1.0, np.float32)), g.const(0.0, np.float32))
    pos = g.op("Cast", pos, to=TensorProto.INT64)  # [B, 1]
    cos, sin = _rope_inputs(g, d, pos)
    mask_add = _padding_add(g, mask)
    h = _decoder_layers(
        g, lm, d, h, cos, sin, mask_add, past, ["batch", d.n_kv, "total", d.head_dim]
    )
    _finish(g, params, lm, d, h, head, ["batch", 1])
    model = g.model("llama_decode", opset)
    if path is not None:
        save_model(model, path)
    return model

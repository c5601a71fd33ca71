"""Flax param tree -> ONNX graphs for CPU runtimes (onnxruntime, DeepSparse 1.8).

Graphs are built with ``onnx.helper`` directly from the parameter tree described in
``docs/architecture.md`` (kernels ``[in, out]``), with numpy initializers, so a masked weight's
zeros stay exact zeros and the runtime sees the sparsity. Every linear layer is a ``MatMul``
whose right-hand side is a constant initializer in ``[in, out]`` layout: the form DeepSparse's
sparse kernels pick up. Default opset 14, IR version 8 (DeepSparse 1.8 reads opset <= 17, IR <= 8).

Three graphs:

* :func:`export_decoder_prefill`: LLaMA decoder over a sequence. Inputs ``inputs_embeds``
  ``[B, T, H]`` (or ``input_ids`` ``[B, T]``) and ``attention_mask`` ``[B, T]`` (1 = token,
  0 = left padding). Outputs ``logits`` ``[B, T, V]`` (or ``last_hidden_state`` with
  ``head=False``) and ``present.<i>.key`` / ``present.<i>.value`` ``[B, KVH, T, D]`` per layer
  (after RoPE, as HF caches them).
* :func:`export_decoder_decode`: one new token with the cache. Inputs ``inputs_embeds``
  ``[B, 1, H]`` (or ``input_ids`` ``[B, 1]``), ``attention_mask`` ``[B, P + 1]`` (past and
  the new token) and ``past_key_values.<i>.key`` / ``.value`` ``[B, KVH, P, D]``; outputs
  ``logits`` ``[B, 1, V]`` and ``present.<i>.*`` ``[B, KVH, P + 1, D]``. P is dynamic.
* :func:`export_llava_prefill`: CLIP vision tower + projector + merge of image features
  at ``image_token_index`` positions + the decoder prefill. Inputs ``input_ids``,
  ``pixel_values`` ``[B_img, C, S, S]`` and ``attention_mask``.

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

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 14
IR_VERSION = 8
MAX_OPSET = 17
MAX_IR_VERSION = 8
# additive mask value; finite so that a fully masked (padding) row stays finite
MASK_VALUE = -1e9
# protobuf cannot serialise more than 2 GiB; above this the weights go to an external file
_EXTERNAL_DATA_BYTES = 1_800_000_000

__all__ = [
    "DEFAULT_OPSET",
    "export_decoder_prefill",
    "export_decoder_decode",
    "export_llava_prefill",
    "export_all",
    "save_model",
    "text_config",
    "rope_tables",
]


# --------------------------------------------------------------------------- config / params


def text_config(config: Any) -> Any:
    """The text (LLaMA) part of a config: ``config.text`` when present, else ``config``."""
    return getattr(config, "text", None) or getattr(config, "text_config", None) or config


def _vision_config(config: Any) -> Any:
    vc = getattr(config, "vision", None) or getattr(config, "vision_config", None)
    if vc is None:
        raise ValueError("config has no vision part (.vision / .vision_config)")
    return vc


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


class _Dims:
    def __init__(self, cfg: Any):
        self.hidden = int(_get(cfg, "hidden_size"))
        self.n_layers = int(_get(cfg, "num_hidden_layers"))
        self.n_heads = int(_get(cfg, "num_attention_heads"))
        self.n_kv = int(_get(cfg, "num_key_value_heads") or self.n_heads)
        hd = _get(cfg, "head_dim")
        self.head_dim = int(hd) if hd else self.hidden // self.n_heads
        self.eps = float(_get(cfg, "rms_norm_eps", 1e-6))
        self.theta = float(_get(cfg, "rope_theta", 10000.0))
        self.max_pos = int(_get(cfg, "max_position_embeddings", 4096) or 4096)
        self.vocab = int(_get(cfg, "vocab_size"))
        self.tied = bool(_get(cfg, "tie_word_embeddings", False))
        if self.n_heads % self.n_kv:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.n_rep = self.n_heads // self.n_kv


def _np(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return a


def _language_model(params: Mapping) -> Mapping:
    return params["language_model"] if "language_model" in params else params


def rope_tables(head_dim: int, theta: float, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin tables ``[max_pos, head_dim]``, computed in float32 as HF does."""
    inv_freq = 1.0 / (
        np.float32(theta)
        ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    )
    inv_freq = inv_freq.astype(np.float32)
    t = np.arange(max_pos, dtype=np.float32)
    freqs = np.outer(t, inv_freq).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


# --------------------------------------------------------------------------- graph builder


class _Graph:
    """Minimal helper around onnx.helper: unique names, initializers, constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.fresh("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, name: str | None = None, n_out: int = 1, **attrs):
        outs = (
            [name or self.fresh(op_type.lower())]
            if n_out == 1
            else [self.fresh(op_type.lower()) for _ in range(n_out)]
        )
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type), **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, opset: int) -> onnx.ModelProto:
        if opset > MAX_OPSET:
            raise ValueError(f"opset {opset} > {MAX_OPSET} (DeepSparse 1.8 limit)")
        # logits / last_hidden_state first, then present.<i>.key / .value in layer order
        outputs = sorted(self.outputs, key=lambda o: o.name.startswith("present."))
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs, outputs, list(self.inits.values())
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name="ellava-jax",
        )
        model.ir_version = IR_VERSION
        return model

    # ---- layers -------------------------------------------------------------------------

    def linear(self, x: str, prefix: str, p: Mapping) -> str:
        """x @ kernel [+ bias]; kernel [in, out] as a constant right-hand side of MatMul."""
        w = self.init(prefix + ".kernel", _np(p["kernel"]))
        y = self.op("MatMul", x, w)
        if "bias" in p and p["bias"] is not None:
            y = self.op("Add", y, self.init(prefix + ".bias", _np(p["bias"])))
        return y

    def rms_norm(self, x: str, prefix: str, scale: Any, eps: float) -> str:
        sq = self.op("Mul", x, x)
        var = self.op("ReduceMean", sq, axes=[-1], keepdims=1)
        # Div by Sqrt, not Mul by Reciprocal: DeepSparse has no Reciprocal kernel
        y = self.op("Div", x, self.op("Sqrt", self.op("Add", var, self.const(eps, np.float32))))
        return self.op("Mul", y, self.init(prefix + ".scale", _np(scale)))

    def layer_norm(self, x: str, prefix: str, p: Mapping, eps: float) -> str:
        mean = self.op("ReduceMean", x, axes=[-1], keepdims=1)
        xc = self.op("Sub", x, mean)
        var = self.op("ReduceMean", self.op("Mul", xc, xc), axes=[-1], keepdims=1)
        y = self.op("Div", xc, self.op("Sqrt", self.op("Add", var, self.const(eps, np.float32))))
        y = self.op("Mul", y, self.init(prefix + ".scale", _np(p["scale"])))
        return self.op("Add", y, self.init(prefix + ".bias", _np(p["bias"])))

    def activation(self, x: str, name: str) -> str:
        name = (name or "gelu").lower()
        if name in ("silu", "swish"):
            return self.op("Mul", x, self.op("Sigmoid", x))
        if name == "quick_gelu":
            return self.op(
                "Mul", x, self.op("Sigmoid", self.op("Mul", x, self.const(1.702, np.float32)))
            )
        if name == "gelu":  # exact (erf) GELU, in the op order torch exports it
            e = self.op("Erf", self.op("Div", x, self.const(np.sqrt(2.0), np.float32)))
            y = self.op("Mul", x, self.op("Add", e, self.const(1.0, np.float32)))
            return self.op("Mul", y, self.const(0.5, np.float32))
        if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh"):
            c = np.sqrt(2.0 / np.pi)
            x3 = self.op("Mul", self.op("Mul", x, x), x)
            inner = self.op(
                "Mul",
                self.op("Add", x, self.op("Mul", x3, self.const(0.044715, np.float32))),
                self.const(c, np.float32),
            )
            t = self.op("Tanh", inner)
            return self.op(
                "Mul",
                self.op("Mul", x, self.const(0.5, np.float32)),
                self.op("Add", t, self.const(1.0, np.float32)),
            )
        if name == "relu":
            return self.op("Relu", x)
        raise ValueError(f"unsupported activation {name!r}")


# --------------------------------------------------------------------------- the decoder


def _embed(g: _Graph, lm: Mapping, ids: str) -> str:
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
        p = lm["layers"][str(i)]
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


def _prefill_body(g: _Graph, params: Mapping, d: _Dims, h: str, mask: str, head: bool) -> None:
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


def _check_inputs(inputs: str) -> None:
    if inputs not in ("embeds", "ids"):
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
    """LLaMA decoder prefill graph (see module docstring); saved to ``path`` when given."""
    _check_inputs(inputs)
    d = _Dims(text_config(config))
    g = _Graph()
    lm = _language_model(params)
    if inputs == "embeds":
        h = g.add_input("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", d.hidden])
    else:
        h = _embed(g, lm, g.add_input("input_ids", TensorProto.INT64, ["batch", "seq"]))
    mask = g.add_input("attention_mask", TensorProto.INT64, ["batch", "seq"])
    _prefill_body(g, params, d, h, mask, head)
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
    _check_inputs(inputs)
    d = _Dims(text_config(config))
    g = _Graph()
    lm = _language_model(params)
    if inputs == "embeds":
        h = g.add_input("inputs_embeds", TensorProto.FLOAT, ["batch", 1, d.hidden])
    else:
        h = _embed(g, lm, g.add_input("input_ids", TensorProto.INT64, ["batch", 1]))
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


# --------------------------------------------------------------------------- LLaVA


def _vision_tower(g: _Graph, params: Mapping, config: Any, pixels: str) -> str:
    """CLIP vision tower -> selected features [B_img, N, D_v] (HF LlavaForConditionalGeneration)."""
    vc = _vision_config(config)
    vp = params["vision_tower"]["vision_model"]
    D = int(_get(vc, "hidden_size"))
    n_heads = int(_get(vc, "num_attention_heads"))
    hd = D // n_heads
    eps = float(_get(vc, "layer_norm_eps", 1e-5))
    act = _get(vc, "hidden_act", "quick_gelu")
    n_layers = int(_get(vc, "num_hidden_layers"))
    patch = int(_get(vc, "patch_size"))
    emb = vp["embeddings"]
    # Conv wants [D, C, P, P]; the tree holds the Flax layout [P, P, C, D]
    w = _np(emb["patch_embedding"]["kernel"]).transpose(3, 2, 0, 1)
    x = g.op(
        "Conv",
        pixels,
        g.init("vision.patch_embedding.weight", w),
        kernel_shape=[patch, patch],
        strides=[patch, patch],
    )
    x = g.op("Reshape", x, g.const([0, 0, -1]))  # [B, D, N]
    x = g.op("Transpose", x, perm=[0, 2, 1])  # [B, N, D]
    cls = g.init("vision.class_embedding", _np(emb["class_embedding"]).reshape(1, 1, D))
    b = g.op("Gather", g.op("Shape", pixels), g.const([0]), axis=0)
    cls = g.op("Expand", cls, g.op("Concat", b, g.const([1, D]), axis=0))
    x = g.op("Concat", cls, x, axis=1)
    x = g.op(
        "Add", x, g.init("vision.position_embedding", _np(emb["position_embedding"]["embedding"]))
    )
    x = g.layer_norm(x, "vision.pre_layrnorm", vp["pre_layrnorm"], eps)
    hidden = [x]
    layers = _get(config, "vision_feature_layer", -2)
    layers = [int(layers)] if isinstance(layers, int) else [int(v) for v in layers]
    wanted = [v % (n_layers + 1) for v in layers]
    stop = max(wanted)
    scale = g.const(hd**-0.5, np.float32)
    for i in range(stop):
        p = vp["encoder"]["layers"][str(i)]
        pre = f"vision.layers.{i}"
        y = g.layer_norm(x, pre + ".layer_norm1", p["layer_norm1"], eps)
        a = p["self_attn"]
        q = g.op("Reshape", g.linear(y, pre + ".q_proj", a["q_proj"]), g.const([0, 0, n_heads, hd]))
        k = g.op("Reshape", g.linear(y, pre + ".k_proj", a["k_proj"]), g.const([0, 0, n_heads, hd]))
        v = g.op("Reshape", g.linear(y, pre + ".v_proj", a["v_proj"]), g.const([0, 0, n_heads, hd]))
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])
        kt = g.op("Transpose", k, perm=[0, 2, 3, 1])
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        s = g.op("Softmax", g.op("Mul", g.op("MatMul", q, kt), scale), axis=-1)
        o = g.op("Transpose", g.op("MatMul", s, v), perm=[0, 2, 1, 3])
        o = g.op("Reshape", o, g.const([0, 0, D]))
        x = g.op("Add", x, g.linear(o, pre + ".out_proj", a["out_proj"]))
        y = g.layer_norm(x, pre + ".layer_norm2", p["layer_norm2"], eps)
        y = g.activation(g.linear(y, pre + ".fc1", p["mlp"]["fc1"]), act)
        x = g.op("Add", x, g.linear(y, pre + ".fc2", p["mlp"]["fc2"]))
        hidden.append(x)
    strategy = _get(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}")
    feats = []
    for w in wanted:
        f = hidden[w]
        if strategy == "default":  # drop CLS
            f = g.op("Slice", f, g.const([1]), g.const([2**62]), g.const([1]))
        feats.append(f)
    # several feature layers are concatenated along the channels, as HF does
    return feats[0] if len(feats) == 1 else g.op("Concat", *feats, axis=-1)


def export_llava_prefill(
    config: Any,
    params: Mapping,
    path: str | os.PathLike | None = None,
    *,
    head: bool = True,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Full LLaVA prefill: vision tower + projector + merge + decoder prefill.

    Inputs ``input_ids`` [B, T] (image placeholders = ``image_token_index``), ``pixel_values``
    [B_img, C, S, S] and ``attention_mask`` [B, T]. The k-th placeholder (row-major over the
    batch) takes the k-th image feature; the count must match (not checked in the graph).
    """
    d = _Dims(text_config(config))
    g = _Graph()
    lm = _language_model(params)
    vc = _vision_config(config)
    size = int(_get(vc, "image_size"))
    ch = int(_get(vc, "num_channels", 3))
    ids = g.add_input("input_ids", TensorProto.INT64, ["batch", "seq"])
    pixels = g.add_input("pixel_values", TensorProto.FLOAT, ["num_images", ch, size, size])
    mask = g.add_input("attention_mask", TensorProto.INT64, ["batch", "seq"])
    feats = _vision_tower(g, params, config, pixels)
    pj = params["multi_modal_projector"]
    act = _get(config, "projector_hidden_act", "gelu")
    f = g.activation(g.linear(feats, "multi_modal_projector.linear_1", pj["linear_1"]), act)
    f = g.linear(f, "multi_modal_projector.linear_2", pj["linear_2"])  # [B_img, N, H]
    f = g.op("Reshape", f, g.const([-1, d.hidden]))
    image_token = int(_get(config, "image_token_index", _get(config, "image_token_id", 32000)))
    # The merge is a handful of integer ops on [B, T] (no weights). DeepSparse 1.8 runs them
    # through its onnxruntime fallback; an all-float rewrite (one-hot MatMul, triangular
    # MatMul cumsums) compiled but crashed its planner (assertion in planner.hpp), so keep these.
    is_img = g.op("Equal", ids, g.const(image_token))  # [B, T]
    safe_ids = g.op("Where", is_img, g.const(0), ids)
    text = _embed(g, lm, safe_ids)  # [B, T, H]
    flat = g.op("Reshape", g.op("Cast", is_img, to=TensorProto.INT64), g.const([-1]))
    idx = g.op("Max", g.op("Sub", g.op("CumSum", flat, g.const(0)), g.const(1)), g.const(0))
    n_feat = g.op("Gather", g.op("Shape", f), g.const([0]), axis=0)
    idx = g.op("Min", idx, g.op("Sub", n_feat, g.const(1)))
    img = g.op("Gather", f, idx, axis=0)  # [B*T, H]
    img = g.op("Reshape", img, g.op("Shape", text))
    h = g.op("Where", g.op("Unsqueeze", is_img, g.const([2])), img, text)
    _prefill_body(g, params, d, h, mask, head)
    model = g.model("llava_prefill", opset)
    if path is not None:
        save_model(model, path)
    return model


# --------------------------------------------------------------------------- saving


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> str:
    """Save; weights go to ``<name>.data`` beside the file when the model nears protobuf's 2 GiB."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > _EXTERNAL_DATA_BYTES:
        onnx.save(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save(model, path)
    return path


def export_all(
    config: Any, params: Mapping, out_dir: str | os.PathLike, *, head: bool = True
) -> dict[str, str]:
    """Write decoder_prefill.onnx, decoder_decode.onnx (both from ``inputs_embeds``) and, when the
    config and params have a vision part, llava_prefill.onnx. Returns {graph name: path}."""
    out_dir = os.fspath(out_dir)
    paths = {
        "decoder_prefill": os.path.join(out_dir, "decoder_prefill.onnx"),
        "decoder_decode": os.path.join(out_dir, "decoder_decode.onnx"),
    }
    export_decoder_prefill(config, params, paths["decoder_prefill"], head=head)
    export_decoder_decode(config, params, paths["decoder_decode"], head=head)
    has_vision = (
        getattr(config, "vision", None) or getattr(config, "vision_config", None)
    ) is not None and "vision_tower" in params
    if has_vision:
        paths["llava_prefill"] = os.path.join(out_dir, "llava_prefill.onnx")
        export_llava_prefill(config, params, paths["llava_prefill"], head=head)
    return paths


def export_model(spec: str, out_dir: str | os.PathLike, *, head: bool = True) -> dict[str, str]:
    """Export ``--model SPEC`` (``toy``, ``tiny`` or an HF LLaVA directory, e.g. a pruned model
    saved by ``ellava prune``: its zeros go through as zeros) to ``out_dir``."""
    import jax

    from ellava_jax.models import load_model

    config, params, _ = load_model(spec)
    params = jax.tree_util.tree_map(np.asarray, params)
    return export_all(config, params, out_dir, head=head)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m convert.onnx",
        description="Export a (pruned) LLaVA to ONNX: decoder prefill, decoder decode step, "
        "full LLaVA prefill (opset 14, IR version 8; DeepSparse 1.8 and onnxruntime).",
    )
    ap.add_argument("--model", required=True, help="toy, tiny, or an HF LLaVA directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--no-head", action="store_true", help="output the final hidden state")
    args = ap.parse_args(argv)
    for name, path in export_model(args.model, args.out, head=not args.no_head).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

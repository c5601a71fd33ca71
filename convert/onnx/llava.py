"""The full LLaVA prefill as ONNX: CLIP vision tower, projector, merge of the image features
into the text embeddings, then the decoder prefill of :mod:`convert.onnx.decoder`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from convert.onnx._graph import (
    DEFAULT_OPSET,
    _Dims,
    _get,
    _Graph,
    _language_model,
    _np,
    _vision_config,
    save_model,
    text_config,
)
from convert.onnx.decoder import embed_tokens, prefill_body


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
    text = embed_tokens(g, lm, safe_ids)  # [B, T, H]
    flat = g.op("Reshape", g.op("Cast", is_img, to=TensorProto.INT64), g.const([-1]))
    idx = g.op("Max", g.op("Sub", g.op("CumSum", flat, g.const(0)), g.const(1)), g.const(0))
    n_feat = g.op("Gather", g.op("Shape", f), g.const([0]), axis=0)
    idx = g.op("Min", idx, g.op("Sub", n_feat, g.const(1)))
    img = g.op("Gather", f, idx, axis=0)  # [B*T, H]
    img = g.op("Reshape", img, g.op("Shape", text))
    h = g.op("Where", g.op("Unsqueeze", is_img, g.const([2])), img, text)
    prefill_body(g, params, d, h, mask, head)
    model = g.model("llava_prefill", opset)
    if path is not None:
        save_model(model, path)
    return model

"""The graph builder and what every graph shares: limits, config readers, dims, saving.

:class:`_Graph` wraps ``onnx.helper``: unique names, numpy initializers (a masked weight's zeros
stay exact zeros), deduplicated constants, and the layers built from them (``linear`` as a
``MatMul`` with an ``[in, out]`` constant right-hand side, RMSNorm, LayerNorm, activations).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFAULT_OPSET = 14
IR_VERSION = 8
MAX_OPSET = 17
MAX_IR_VERSION = 8
# additive mask value; finite so that a fully masked (padding) row stays finite
MASK_VALUE = -1e9
# protobuf cannot serialise more than 2 GiB; above this the weights go to an external file
_EXTERNAL_DATA_BYTES = 1_800_000_000


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

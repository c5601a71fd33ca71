"""A llama.cpp GGUF LLaMA file -> an HF `LlamaForCausalLM` directory; numpy only, no torch.

- `read_gguf` opens the file with `gguf.GGUFReader` (metadata and the raw bytes of each tensor)
  and refuses, before anything is written, what this converter cannot turn into an HF LLaMA:
  another architecture, a tensor type other than F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1, a
  tensor that is not part of a LLaMA, RoPE scaling, a tokenizer other than byte-level BPE.
- `dequantize` decodes one tensor's bytes to float32 (ggml's block layouts, below).
- `llama_state_dict` names the tensors as HF does and undoes llama.cpp's row permutation of
  the q / k projections (`unpermute_rows`).
- `llama_config`, `tokenizer_files`: config.json and the tokenizer files from the metadata.
- `convert_gguf` writes them all (model.safetensors, float32 or bfloat16) into a directory.

ggml's block formats (32 weights a block, along a row; little endian):
  Q8_0  f16 d, int8 q[32]                        x = d * q
  Q4_0  f16 d, uint8 qs[16]                      x = d * (q - 8)
  Q4_1  f16 d, f16 m, uint8 qs[16]               x = d * q + m
  where weight j < 16 is the low nibble of qs[j] and weight 16 + j its high nibble.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from ellava_jax.errors import UserError

ARCHITECTURES = ("llama",)
BLOCK = 32
# ggml type name -> (bytes per block, weights per block)
TYPES = {
    "F32": (4, 1),
    "F16": (2, 1),
    "BF16": (2, 1),
    "Q8_0": (2 + BLOCK, BLOCK),
    "Q4_0": (2 + BLOCK // 2, BLOCK),
    "Q4_1": (4 + BLOCK // 2, BLOCK),
}

TOKENIZER_MODELS = ("gpt2",)
# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp's regexes)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "smollm": "smollm",  # single digits, then GPT-2's split
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# dequantisation


def _f16(cols: np.ndarray) -> np.ndarray:
    """Two bytes per row of an [n, 2] uint8 array -> float32 [n, 1]."""
    return np.ascontiguousarray(cols).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] values 0..15 (low nibbles first, then high ones)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor's bytes (uint8, as stored in the file) -> float32 array of numpy `shape`.

    Raises:
      UserError: an unsupported type, or a byte count that does not fit the shape.
    """
    if type_name not in TYPES:
        raise UserError(f"GGUF tensor type {type_name} is not supported ({', '.join(TYPES)})")
    size, per = TYPES[type_name]
    n = int(np.prod(shape, dtype=np.int64))
    if n % per or raw.size != n // per * size:
        raise UserError(f"{type_name} tensor of shape {list(shape)}: {raw.size} bytes do not fit")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if type_name == "F32":
        out = raw.view("<f4").astype(np.float32)
    elif type_name == "F16":
        out = raw.view("<f2").astype(np.float32)
    elif type_name == "BF16":
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = raw.reshape(-1, size)
        d = _f16(blocks[:, 0:2])
        if type_name == "Q8_0":
            out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
        elif type_name == "Q4_0":
            q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
            out = d * q.astype(np.float32)
        else:  # Q4_1
            m = _f16(blocks[:, 2:4])
            out = d * _nibbles(blocks[:, 4:]).astype(np.float32) + m
    return out.reshape(shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q / k row order.

    convert_hf_to_gguf stores each head's rows as interleaved pairs (the GGML "normal" RoPE
    layout): HF row `h*D + s*D/2 + j` (s in {0, 1}, j < D/2) is GGUF row `h*D + 2*j + s`.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise UserError(f"cannot undo the q/k permutation: {rows} rows for {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# reading


_MISSING = object()


@dataclass
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]  # numpy order (rows first): GGUF's dims reversed
    offset: int  # in the file
    n_bytes: int


class GGUFFile:
    """A GGUF file's metadata and tensor table, checked for what the converter supports."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise UserError(f"{self.path}: not a readable GGUF file ({e})") from None
        if self._reader.endianess != gguf.GGUFEndian.LITTLE:
            raise UserError(f"{self.path}: big-endian GGUF files are not supported")
        self._values: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            self.tensors[t.name] = TensorInfo(
                name=t.name,
                type_name=t.tensor_type.name,
                shape=tuple(int(x) for x in reversed(t.shape)),
                offset=int(t.data_offset),
                n_bytes=int(t.n_bytes),
            )

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default=None):
        """The metadata value at `key` (lists as Python lists, read once), or `default`."""
        if key not in self._values:
            f = self._reader.fields.get(key)
            if f is None:
                return default
            self._values[key] = f.contents()
        return self._values[key]

    def need(self, key: str, kind=None):
        """The metadata value at `key`; refuses a missing key or one of the wrong kind."""
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise UserError(f"{self.path}: the GGUF metadata lacks {key}")
        if (kind is not None and not isinstance(v, kind)) or (kind is int and isinstance(v, bool)):
            raise UserError(f"{self.path}: GGUF metadata {key} = {v!r} has the wrong type")
        return v

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self._reader.data[t.offset : t.offset + t.n_bytes]

    def load(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return dequantize(self.raw(name), t.type_name, t.shape)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Opens a GGUF file and refuses what cannot become an HF LLaMA, naming it."""
    g = GGUFFile(path)
    arch = g.need("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{g.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    bad: dict[str, list[str]] = {}
    for t in g.tensors.values():
        if t.type_name not in TYPES:
            bad.setdefault(t.type_name, []).append(t.name)
    if bad:
        what = "; ".join(
            f"{k} ({v[0]}" + (f" and {len(v) - 1} more)" if len(v) > 1 else ")")
            for k, v in sorted(bad.items())
        )
        raise UserError(
            f"{g.path}: GGUF tensor type(s) not supported: {what}; supported: {', '.join(TYPES)}"
        )
    config = llama_config(g)  # refuses missing or unsupported settings
    _tensor_names(g, config)  # refuses unknown or missing tensors
    model = g.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise UserError(
            f"{g.path}: GGUF tokenizer.ggml.model {model!r} is not supported "
            f"(supported: {', '.join(TOKENIZER_MODELS)})"
        )
    pre = g.get("tokenizer.ggml.pre")
    if pre is not None and pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{g.path}: GGUF tokenizer.ggml.pre {pre!r} is not supported "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    return g


# ---------------------------------------------------------------------------------------------
# config and tensors


def llama_config(g: GGUFFile) -> dict:
    """config.json of `LlamaForCausalLM` from a llama GGUF's metadata."""
    a = g.need("general.architecture", str)
    hidden = g.need(f"{a}.embedding_length", int)
    heads = g.need(f"{a}.attention.head_count", int)
    kv_heads = g.get(f"{a}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise UserError(f"{g.path}: {a}.attention.head_count_kv must be one number, not per layer")
    if heads <= 0 or hidden % heads or kv_heads <= 0 or heads % kv_heads:
        raise UserError(
            f"{g.path}: {heads} attention heads / {kv_heads} KV heads do not fit "
            f"hidden size {hidden}"
        )
    head_dim = g.get(f"{a}.attention.key_length", hidden // heads)
    if g.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise UserError(
            f"{g.path}: a value head size other than the key head size is not supported"
        )
    rope_dim = g.get(f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UserError(
            f"{g.path}: {a}.rope.dimension_count {rope_dim} != head size {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    for key in (f"{a}.rope.scaling.type", f"{a}.rope.scale_linear"):
        v = g.get(key)
        if v not in (None, "none", 1.0):
            raise UserError(f"{g.path}: GGUF {key} = {v!r}: RoPE scaling is not supported")
    if g.get(f"{a}.expert_count", 0):
        raise UserError(f"{g.path}: GGUF {a}.expert_count: mixture-of-experts is not supported")
    vocab = g.get(f"{a}.vocab_size")
    if vocab is None:  # older files: the embedding's rows
        embd = g.tensors.get("token_embd.weight")
        vocab = embd.shape[0] if embd is not None else None
    if not isinstance(vocab, int):
        raise UserError(f"{g.path}: cannot tell the vocabulary size")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": g.need(f"{a}.feed_forward_length", int),
        "num_hidden_layers": g.need(f"{a}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(g.need(f"{a}.attention.layer_norm_rms_epsilon", float)),
        "rope_theta": float(g.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": g.need(f"{a}.context_length", int),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        v = g.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            config[f"{name}_token_id"] = v
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape, for a llama config."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "self_attn.q_proj": (q * d, h),
        "self_attn.k_proj": (kv * d, h),
        "self_attn.v_proj": (kv * d, h),
        "self_attn.o_proj": (h, q * d),
        "mlp.gate_proj": (f, h),
        "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }
    for i in range(config["num_hidden_layers"]):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}.weight"] = s
    return shapes


def hf_name(gguf_name: str, num_layers: int) -> str | None:
    """The HF name of a llama GGUF tensor, or None for a tensor a LLaMA does not have."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and int(m.group(1)) < num_layers and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{int(m.group(1))}.{_LAYER_TENSORS[m.group(2)]}.weight"
    return None


def _tensor_names(g: GGUFFile, config: dict) -> dict[str, str]:
    """GGUF name -> HF name for every tensor; refuses unknown, missing or misshapen ones."""
    n = config["num_hidden_layers"]
    names, unknown = {}, []
    for name in g.tensors:
        hf = hf_name(name, n)
        if hf is None:
            unknown.append(name)
        else:
            names[name] = hf
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UserError(
            f"{g.path}: GGUF tensor(s) {', '.join(unknown[:3])}{more} are not part of a "
            "LLaMA this converter supports"
        )
    shapes = _expected_shapes(config)
    missing = sorted(set(shapes) - set(names.values()))
    if missing:
        raise UserError(f"{g.path}: the GGUF lacks tensors for {', '.join(missing[:3])}")
    for name, hf in names.items():
        if g.tensors[name].shape != shapes[hf]:
            raise UserError(
                f"{g.path}: GGUF tensor {name} has shape {list(g.tensors[name].shape)}, "
                f"expected {list(shapes[hf])} from the metadata"
            )
    return names


def llama_state_dict(g: GGUFFile, config: dict | None = None, layers=None, dtype=np.float32):
    """HF name -> dequantised array (q / k rows back in HF order).

    Args:
      layers: decoder layers to read (default all); the non-layer tensors are always read.
      dtype: numpy dtype of the arrays (float32, or ml_dtypes.bfloat16).
    """
    config = config or llama_config(g)
    names = _tensor_names(g, config)
    keep = None if layers is None else {f"model.layers.{i}." for i in layers}
    out = {}
    for name, hf in names.items():
        if (
            keep is not None
            and hf.startswith("model.layers.")
            and not any(hf.startswith(p) for p in keep)
        ):
            continue
        w = g.load(name)
        if hf.endswith("q_proj.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        out[hf] = np.ascontiguousarray(w.astype(dtype, copy=False))
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "llama3":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def build_tokenizer(g: GGUFFile):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF's tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens = g.need("tokenizer.ggml.tokens", list)
    merges_raw = g.need("tokenizer.ggml.merges", list)
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise UserError(f"{g.path}: tokenizer.ggml.token_type and .tokens differ in length")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        _say(f"{g.path}: {len(tokens) - len(vocab)} duplicate token(s); the first id kept")
    merges = []
    for i, m in enumerate(merges_raw):
        parts = m.split(" ")
        if len(parts) != 2:
            raise UserError(f"{g.path}: tokenizer.ggml.merges[{i}] = {m!r} is not one pair")
        merges.append((parts[0], parts[1]))
    pre = PRE_TOKENIZERS[g.get("tokenizer.ggml.pre") or "default"]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=pre == "llama3",  # llama.cpp looks whole words up first for these
        )
    )
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k in (_CONTROL, _UNKNOWN)
    ]
    added = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    byte_level = processors.ByteLevel(trim_offsets=False)
    add_bos, add_eos = _add_bos_eos(g)
    ends = {}  # the tokens the post-processor adds: "bos" / "eos" -> (text, id)
    for which, wanted in (("bos", add_bos), ("eos", add_eos)):
        i = g.get(f"tokenizer.ggml.{which}_token_id")
        if wanted and i is not None:
            ends[which] = (_special_token(g, which), i)
    if ends:

        def seq(piece: str, type_id: int) -> str:
            parts = [f"{ends[w][0]}:{type_id}" for w in ("bos",) if w in ends]
            parts.append(f"{piece}:{type_id}")
            parts += [f"{ends[w][0]}:{type_id}" for w in ("eos",) if w in ends]
            return " ".join(parts)

        template = processors.TemplateProcessing(
            single=seq("$A", 0),
            pair=f"{seq('$A', 0)} {seq('$B', 1)}",
            special_tokens=sorted(set(ends.values())),
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok


def _add_bos_eos(g: GGUFFile) -> tuple[bool, bool]:
    return (
        bool(g.get("tokenizer.ggml.add_bos_token", False)),
        bool(g.get("tokenizer.ggml.add_eos_token", False)),
    )


def _special_token(g: GGUFFile, which: str) -> str | None:
    key = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}[which]
    i = g.get(f"tokenizer.ggml.{key}_token_id")
    tokens = g.get("tokenizer.ggml.tokens")
    if i is None or tokens is None:
        return None
    if not 0 <= i < len(tokens):
        raise UserError(f"{g.path}: tokenizer.ggml.{key}_token_id {i} is outside the vocabulary")
    return tokens[i]


def tokenizer_files(g: GGUFFile, context_length: int | None = None) -> dict[str, str]:
    """File name -> text of tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tok = build_tokenizer(g)
    specials = {f"{k}_token": _special_token(g, k) for k in ("bos", "eos", "unk", "pad")}
    specials = {k: v for k, v in specials.items() if v is not None}
    add_bos, add_eos = _add_bos_eos(g)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    if context_length:
        config["model_max_length"] = context_length
    template = g.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False),
    }


# ---------------------------------------------------------------------------------------------
# the directory


def output_bytes(g: GGUFFile, dtype: str = "float32") -> int:
    """About what `convert_gguf` writes: the weights at `dtype` and the tokenizer."""
    n = sum(int(np.prod(t.shape, dtype=np.int64)) for t in g.tensors.values())
    return n * (2 if dtype == "bfloat16" else 4) + 16 * 2**20


def write_hf_llama(out: str, g: GGUFFile, dtype: str = "float32") -> dict:
    """Writes config.json, generation_config.json, model.safetensors and the tokenizer files
    into the existing directory `out`; returns the config."""
    from safetensors.numpy import save_file

    np_dtype = np.float32
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    elif dtype != "float32":
        raise UserError(f"--dtype {dtype}: expected float32 or bfloat16")
    config = llama_config(g)
    config["torch_dtype"] = dtype
    files = tokenizer_files(g, config["max_position_embeddings"])
    tensors = llama_state_dict(g, config, dtype=np_dtype)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    for name, text in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    return config


def convert_gguf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    command: str = "convert",
) -> dict:
    """A GGUF LLaMA file -> an HF LlamaForCausalLM directory at `out` (written atomically).

    Everything refusable is refused before `out` is touched. Returns the config written.
    """
    from ellava_jax.inputs import check_file
    from ellava_jax.outputs import atomic_directory, claim_output

    path = check_file(path, "GGUF file")
    g = read_gguf(path)
    target = claim_output(
        out, command, overwrite=overwrite, inputs=[path], need_bytes=output_bytes(g, dtype)
    )
    with atomic_directory(target, command) as tmp:
        return write_hf_llama(tmp, g, dtype)

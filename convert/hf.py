"""HF LLaVA or LLaMA directory (config.json + safetensors) <-> (LlavaConfig, Flax params). No torch.

The converter is a pure mapping between flat HF state-dict keys and paths in the parameter
tree (docs/architecture.md), plus one transform per leaf kind. It is the only place in the
project where weights are transposed: HF linears are `weight [out, in]`, ours `kernel [in, out]`;
the patch-embedding conv goes `[D, C, P, P] -> [P, P, C, D]`.

Key layouts read: the hub's (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`; what transformers also writes), the
in-memory one of transformers 5 (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*`), and a vision tower with or without its
`vision_model.` level. Written: the hub layout, which every transformers version loads.

A plain LLaMA causal LM (`model_type: llama`, `LlamaForCausalLM`; the text-only `LlavaConfig`)
is read and written in its own layout: `model.embed_tokens.weight`, `model.layers.N.*`,
`model.norm.weight`, `lm_head.weight` (absent when tied), with the same checks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import jax.numpy as jnp
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from ellava_jax.config import ConfigError, LlavaConfig
from ellava_jax.errors import MissingInput, UserError
from ellava_jax.inputs import check_dir, check_file
from ellava_jax.model.llava import param_shapes
from ellava_jax.outputs import atomic_directory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")

# Files copied along with the weights when saving from a source directory.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(UserError):
    """A checkpoint that does not match its config: names the file and the key."""


def _canonical_key(key: str, text_only: bool = False) -> str:
    """Any accepted layout -> the hub layout (a LLaMA's keys are already canonical)."""
    if text_only:
        return key
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(new):
            key = old + key[len(new) :]
            break
    else:
        if key.startswith("lm_head."):
            key = "language_model." + key
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def _hf_key(path: tuple[str, ...], text_only: bool = False) -> str:
    """Parameter-tree path -> hub-layout key (or LlamaForCausalLM key, `text_only`)."""
    *mods, leaf = path
    name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if text_only:
        if mods[0] == "language_model":
            mods = ["model", *mods[1:]]
        return ".".join([*mods, name])
    if mods[0] == "lm_head":
        return "language_model.lm_head." + name
    if mods[0] == "language_model":
        mods = ["language_model", "model", *mods[1:]]
    return ".".join([*mods, name])


def _to_hf(path: tuple[str, ...], x):
    if path[-1] == "kernel":
        return jnp.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
    return x


def _from_hf(path: tuple[str, ...], x):
    if path[-1] == "kernel":
        return jnp.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
    return x


def _hf_shape(path, shape) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return tuple(shape[i] for i in ((3, 2, 0, 1) if len(shape) == 4 else (1, 0)))
    return tuple(shape)


def _flatten(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


STACKED = ("language_model", "layers")  # the decoder's layers, stacked [L, ...] in memory


def key_map(
    config: LlavaConfig,
) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
    """HF key (hub layout; LlamaForCausalLM's for a text-only config) -> (parameter path,
    layer index in the stack or None, HF shape), for every parameter of `config`. A decoder
    layer's weight is one HF tensor per layer (`model.layers.N.*`) and one stacked leaf here."""
    shapes = param_shapes(config)
    t, out = config.is_text_only, {}
    for p, s in _flatten(shapes):
        if p[:2] != STACKED:
            out[_hf_key(p, t)] = (p, None, _hf_shape(p, s.shape))
            continue
        for i in range(s.shape[0]):
            out[_hf_key((*STACKED, str(i), *p[2:]), t)] = (p, i, _hf_shape(p, s.shape[1:]))
    return out


def _head_key(config: LlavaConfig) -> str:
    return "lm_head.weight" if config.is_text_only else "language_model.lm_head.weight"


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.lexists(index):
        check_file(index, "safetensors index")
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        for f in files:
            if not isinstance(f, str) or not os.path.exists(os.path.join(path, f)):
                raise CheckpointError(f"{index}: lists shard {f!r}, which does not exist in {path}")
            check_file(os.path.join(path, f), "safetensors shard")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.lexists(single):
        check_file(single, "safetensors file")
        return [SINGLE_FILE]
    raise MissingInput(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")


def _check_values(fpath: str, key: str, x) -> None:
    """A weight must be floating-point and finite: an integer tensor would be used as its raw
    integers (quantized weights need their scales), NaN or inf poisons every output."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise CheckpointError(
            f"{fpath}: tensor {key!r} has dtype {x.dtype}, expected floating-point weights "
            "(quantized checkpoints are not supported)"
        )
    bad = int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
    if bad:
        raise CheckpointError(f"{fpath}: tensor {key!r} holds {bad} NaN or inf value(s)")


def load_hf_llava(path: str | os.PathLike, dtype=None) -> tuple[LlavaConfig, dict]:
    """Reads a local HF LLaVA directory, or a LLaMA causal LM's (`LlamaForCausalLM`: the
    text-only config, whose params have no vision tower and no projector).

    Args:
      path: directory with `config.json` and `model.safetensors` or a sharded index.
      dtype: cast every parameter to this dtype (default: keep the checkpoint's).

    Returns:
      (config, params) with params in the tree of docs/architecture.md.

    Raises:
      MissingInput, ConfigError or CheckpointError naming the file and the key (all
      UserErrors): also a tensor that is not floating-point or holds NaN or inf.
    """
    path = check_dir(os.fspath(path), "model directory", missing="not a directory")
    config = LlavaConfig.from_hf_config(path)
    expected = key_map(config)
    found: dict[str, tuple[str, str]] = {}  # canonical key -> (file, original key)
    handles = {}
    try:
        for fname in _weight_files(path):
            fpath = os.path.join(path, fname)
            try:
                handles[fname] = safe_open(fpath, framework="flax")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{fpath}: cannot read safetensors file ({e})") from e
            for k in handles[fname].keys():
                if k.endswith(_IGNORED_SUFFIXES):
                    continue
                ck = _canonical_key(k, config.is_text_only)
                if ck == _head_key(config) and config.tie_word_embeddings:
                    continue  # tied: the head is the embedding
                if ck in found:
                    raise CheckpointError(f"{fpath}: key {k!r} also in {found[ck][0]}")
                found[ck] = (fname, k)
        extra = sorted(set(found) - set(expected))
        kind = "LLaMA causal LM" if config.is_text_only else "LLaVA"
        if extra:
            f, k = found[extra[0]]
            raise CheckpointError(
                f"{os.path.join(path, f)}: unexpected tensor {k!r} (not in a {kind} of this "
                f"config; {len(extra)} unexpected in all)"
            )
        missing = sorted(set(expected) - set(found))
        if missing:
            raise CheckpointError(
                f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)"
            )
        params: dict = {}
        layers: dict[tuple[str, ...], list] = {}  # stacked path -> its per-layer arrays
        for ck, (p, i, hf_shape) in expected.items():
            fname, k = found[ck]
            fpath = os.path.join(path, fname)
            try:
                x = handles[fname].get_tensor(k)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{fpath}: cannot read tensor {k!r} ({e})") from e
            if tuple(x.shape) != hf_shape:
                raise CheckpointError(
                    f"{fpath}: tensor {k!r} has shape {tuple(x.shape)}, config.json implies {hf_shape}"
                )
            _check_values(fpath, k, x)
            x = _from_hf(p, x)
            x = x if dtype is None else x.astype(dtype)
            if i is None:
                _set(params, p, x)
            else:
                layers.setdefault(p, []).append(x)  # key_map lists layers in order
        for p, xs in layers.items():
            _set(params, p, jnp.stack(xs))
            xs.clear()
    finally:
        handles.clear()
    return config, params


def save_hf_llava(
    path: str | os.PathLike,
    config: LlavaConfig,
    params: dict,
    *,
    copy_from: str | os.PathLike | None = None,
    max_shard_bytes: int | None = None,
    command: str | None = None,
) -> None:
    """Writes an HF LLaVA directory that `LlavaForConditionalGeneration.from_pretrained` loads
    (for a text-only config: a LLaMA directory that `LlamaForCausalLM.from_pretrained` loads).

    The directory is written beside `path` under a temporary name and renamed into place, so a
    failure never leaves a half-written `path` (an existing one is replaced only at the end).

    Args:
      path: output directory.
      config: the model's config (written as config.json).
      params: the parameter tree.
      copy_from: a directory whose tokenizer / processor files are copied along.
      max_shard_bytes: split the weights into shards of at most this size, with an index.
      command: the command whose output this is (the directory is marked as its).
    """
    tensors = _hf_tensors(config, params)
    with atomic_directory(path, command) as tmp:
        _write_hf_files(tmp, config, tensors, copy_from, max_shard_bytes)


def write_hf_llava(directory: str, config: LlavaConfig, params: dict, *, copy_from=None) -> None:
    """The files of `save_hf_llava` into an existing directory (for callers that make their
    own atomic directory and add files beside the model's)."""
    _write_hf_files(directory, config, _hf_tensors(config, params), copy_from, None)


def _hf_tensors(config: LlavaConfig, params: dict) -> dict:
    """Hub-layout key -> HF-shaped tensor; an error when params and config disagree."""
    expected = key_map(config)
    flat = dict(_flatten(params))
    paths = {v[0] for v in expected.values()}
    missing = sorted("/".join(p) for p in paths - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - paths)
    if missing or extra:
        raise CheckpointError(
            f"params do not match the config: missing {missing[:3]}, extra {extra[:3]}"
        )
    tensors = {}
    for key, (p, i, hf_shape) in expected.items():
        x = jnp.asarray(flat[p] if i is None else flat[p][i])
        if _hf_shape(p, x.shape) != hf_shape:
            raise CheckpointError(
                f"param {'/'.join(p)} has shape {x.shape}, config implies another"
            )
        tensors[key] = _to_hf(p, x)
    return tensors


def _write_hf_files(out: str, config, tensors: dict, copy_from, max_shard_bytes) -> None:
    if copy_from is not None:
        for name in _SIDE_FILES:
            src = os.path.join(os.fspath(copy_from), name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(out, name))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_hf_config(), f, indent=2)
    _write_weights(out, tensors, max_shard_bytes)


def _write_weights(out: str, tensors: dict, max_shard_bytes: int | None) -> None:
    meta = {"format": "pt"}  # transformers requires it to load a safetensors file
    arrays = tensors
    if max_shard_bytes is None:
        save_file(arrays, os.path.join(out, SINGLE_FILE), metadata=meta)
        return
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(arrays):
        nbytes = arrays[k].size * arrays[k].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = arrays[k]
        size += nbytes
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata=meta)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.size * v.dtype.itemsize
    with open(os.path.join(out, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "key_map",
    "load_hf_llava",
    "save_hf_llava",
    "write_hf_llava",
]

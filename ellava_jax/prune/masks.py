"""Masks over the decoder's linear weights, sparsity summaries, and policies -> per-matrix ratios.

A mask tree holds only the pruned kernels, one per layer
(`language_model/layers/<i>/{self_attn,mlp}/<name>/kernel`, as in masks.npz), each a boolean
array shaped like the kernel, True where the weight is kept; the parameter tree holds the same
kernels stacked over the layers (`get_kernel`). Everything else in the model stays dense.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file

# The seven linear weights of a LLaMA decoder layer, as "module.name" (HF naming).
MATRICES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def kernel_path(layer: int, matrix: str) -> tuple[str, ...]:
    """Path of one decoder linear's kernel in a mask tree (and masks.npz); `[3:]` is its path
    inside one layer's tree. The parameter tree stacks the layers: read it by `get_kernel`."""
    module, name = matrix.split(".")
    return ("language_model", "layers", str(layer), module, name, "kernel")


def get_kernel(params: Mapping, layer: int, matrix: str):
    """One decoder linear's [in, out] kernel, out of the stacked decoder layers."""
    return get_path(params, _stacked_path(matrix))[layer]


def _stacked_path(matrix: str) -> tuple[str, ...]:
    """Path of a matrix's kernel stack [L, in, out] in the parameter tree."""
    p = kernel_path(0, matrix)
    return (*p[:2], *p[3:])


def decoder_linears(config: LlavaConfig) -> Iterator[tuple[int, str]]:
    """(layer, matrix) for every prunable weight, in execution order."""
    for layer in range(config.text.num_hidden_layers):
        for m in MATRICES:
            yield layer, m


def matrix_shape(config: LlavaConfig, matrix: str) -> tuple[int, int]:
    """[in, out] of one decoder linear."""
    t = config.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return {
        "self_attn.q_proj": (t.hidden_size, q),
        "self_attn.k_proj": (t.hidden_size, kv),
        "self_attn.v_proj": (t.hidden_size, kv),
        "self_attn.o_proj": (q, t.hidden_size),
        "mlp.gate_proj": (t.hidden_size, t.intermediate_size),
        "mlp.up_proj": (t.hidden_size, t.intermediate_size),
        "mlp.down_proj": (t.intermediate_size, t.hidden_size),
    }[matrix]


def matrix_size(config: LlavaConfig, matrix: str) -> int:
    a, b = matrix_shape(config, matrix)
    return a * b


def get_path(tree: Mapping, path: Sequence[str]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: Sequence[str], value) -> dict:
    """Returns a copy of `tree` with `value` at `path` (copies only the dicts on the path)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree.get(path[0], {}), path[1:], value)
    return out


def _iter_leaves(tree: Mapping, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _iter_leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def apply_masks(params: dict, masks: Mapping) -> dict:
    """params with every masked kernel multiplied by its mask (zeros exactly where False).
    A mask tree names decoder layers one by one (`kernel_path`); their kernels are rows of the
    stacked decoder (`get_kernel`)."""
    out = params
    per_stack: dict[tuple[str, ...], dict[int, object]] = {}
    for path, m in _iter_leaves(masks):
        if path[:2] == ("language_model", "layers"):
            per_stack.setdefault((*path[:2], *path[3:]), {})[int(path[2])] = m
            continue
        w = get_path(params, path)
        out = set_path(out, path, jnp.where(m, w, jnp.zeros((), w.dtype)))
    for path, rows in per_stack.items():
        w = get_path(params, path)
        full = [rows.get(i, jnp.ones(w.shape[1:], bool)) for i in range(w.shape[0])]
        out = set_path(out, path, jnp.where(jnp.stack(full), w, jnp.zeros((), w.dtype)))
    return out


def masks_from_params(config: LlavaConfig, params: dict) -> dict:
    """The mask tree implied by the zeros of the decoder linears (one entry per layer and
    matrix, the layout of masks.npz)."""
    masks: dict = {}
    for layer, m in decoder_linears(config):
        masks = set_path(masks, kernel_path(layer, m), get_kernel(params, layer, m) != 0)
    return masks


# ---------------------------------------------------------------------------------------------
# Policies


class _PolicyList(list):
    """A policy read from a file: a list that remembers the file, for error messages."""

    source: str | None = None


class _PolicyDict(dict):
    """A policy read from a file: a dict that remembers the file, for error messages."""

    source: str | None = None


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def _sparsity(value, where: str) -> float:
    """A policy entry as a sparsity in [0, 1); anything else is a UserError naming `where`."""
    if not _is_number(value):
        raise UserError(
            f"{where} is {json.dumps(value) if _jsonable(value) else repr(value)}; expected a "
            "sparsity in [0, 1)"
        )
    s = float(value)
    if not 0.0 <= s < 1.0:
        raise UserError(f"{where}: sparsity {value} is outside [0, 1)")
    return s


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def policy_to_sparsities(config: LlavaConfig, policy) -> dict[tuple[int, str], float]:
    """Per-matrix sparsity from a policy.

    Accepted forms: a float (uniform); a list of one sparsity per decoder layer (the paper's
    default, applied to all seven matrices of the layer); a list of lists, one sparsity per
    matrix in `MATRICES` order for each layer; or a dict {"<layer>.<module>.<name>": s}
    (every matrix must be listed). Every sparsity is a number in [0, 1); anything else (a
    string, null, an object where a number goes) is a UserError naming the entry, and the file
    when the policy came from `load_policy`.
    """
    source = getattr(policy, "source", None)
    head = f"{source}: policy" if source else "policy"
    n = config.text.num_hidden_layers
    if _is_number(policy):
        policy = [_sparsity(policy, head)] * n
    if isinstance(policy, Mapping):
        out = {}
        for layer, m in decoder_linears(config):
            key = f"{layer}.{m}"
            if key not in policy:
                raise UserError(f"{head}: no sparsity for matrix {key!r}")
            out[(layer, m)] = _sparsity(policy[key], f"{head} entry {key!r}")
        extra = sorted(
            str(k) for k in set(policy) - {f"{layer}.{m}" for layer, m in decoder_linears(config)}
        )
        if extra:
            raise UserError(f"{head}: unknown matrices {extra[:3]}")
    elif isinstance(policy, Sequence | np.ndarray) and not isinstance(policy, str | bytes):
        policy = list(policy)
        if len(policy) != n:
            raise UserError(f"{head} has {len(policy)} entries, the model has {n} decoder layers")
        out = {}
        for layer, entry in enumerate(policy):
            where = f"{head} entry {layer}"
            if isinstance(entry, Sequence | np.ndarray) and not isinstance(entry, str | bytes):
                entry = list(np.asarray(entry, dtype=object).reshape(-1))
                if len(entry) != len(MATRICES):
                    raise UserError(
                        f"{head} layer {layer}: {len(entry)} entries, expected {len(MATRICES)} "
                        f"({', '.join(MATRICES)})"
                    )
                for j, (m, s) in enumerate(zip(MATRICES, entry)):
                    out[(layer, m)] = _sparsity(s, f"{where} [{j}] ({m})")
            else:
                s = _sparsity(entry, where)
                out.update({(layer, m): s for m in MATRICES})
    else:
        raise UserError(
            f"{head} is a {type(policy).__name__}; expected a sparsity, a list of them (one per "
            "decoder layer, or per matrix) or an object {'<layer>.<module>.<name>': sparsity}"
        )
    return out


def load_policy(path: str) -> list | dict | float:
    """A policy JSON: a number, a list, a dict, or an object with a `policy` entry (a search
    result). Each entry must be a sparsity in [0, 1), or a list of seven of them (one per
    matrix); a dict maps "<layer>.<module>.<name>" to sparsities. Anything else (a string, null,
    an object where a number goes) is a UserError naming the file and the entry. A list or dict comes back
    remembering the file (`policy_to_sparsities` names it in its errors)."""
    check_file(path, "policy file")
    with open(path) as f:
        try:
            obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    if isinstance(obj, dict) and "policy" in obj:
        obj = obj["policy"]
    head = f"{path}: policy"
    if _is_number(obj):
        return _sparsity(obj, head)
    if isinstance(obj, list):
        for i, entry in enumerate(obj):
            if isinstance(entry, list):
                if len(entry) != len(MATRICES):
                    raise UserError(
                        f"{head} entry {i}: {len(entry)} sparsities, expected one per matrix "
                        f"({len(MATRICES)}: {', '.join(MATRICES)})"
                    )
                for j, s in enumerate(entry):
                    _sparsity(s, f"{head} entry {i} [{j}] ({MATRICES[j]})")
            else:
                _sparsity(entry, f"{head} entry {i}")
        out = _PolicyList(obj)
    elif isinstance(obj, dict):
        for k, s in obj.items():
            _sparsity(s, f"{head} entry {k!r}")
        out = _PolicyDict(obj)
    else:
        raise UserError(
            f"{head} is {json.dumps(obj)}; expected a sparsity, a list of them (one per decoder "
            "layer, or per matrix) or an object {'<layer>.<module>.<name>': sparsity}"
        )
    out.source = path
    return out


def mean_sparsity(config: LlavaConfig, sparsities: Mapping[tuple[int, str], float]) -> float:
    """Parameter-weighted mean sparsity over the decoder linears."""
    tot = sum(matrix_size(config, m) for _, m in decoder_linears(config))
    return sum(s * matrix_size(config, m) for (_, m), s in sparsities.items()) / tot


# ---------------------------------------------------------------------------------------------
# Summaries and files


def sparsity_summary(config: LlavaConfig, params: dict) -> dict:
    """Measured sparsity per matrix, per layer and overall (parameter-weighted)."""
    layers = []
    zeros_all = size_all = 0
    for layer in range(config.text.num_hidden_layers):
        row = {}
        z_l = n_l = 0
        for m in MATRICES:
            w = get_kernel(params, layer, m)
            z = int(jnp.sum(w == 0))
            row[m] = z / w.size
            z_l, n_l = z_l + z, n_l + w.size
        row["layer"] = z_l / n_l
        layers.append(row)
        zeros_all, size_all = zeros_all + z_l, size_all + n_l
    return {"overall": zeros_all / size_all, "layers": layers}


def format_summary(summary: dict) -> str:
    """A fixed-width table of a `sparsity_summary`."""
    short = [m.split(".")[1].replace("_proj", "") for m in MATRICES]
    lines = ["layer " + " ".join(f"{s:>6}" for s in short) + "    all"]
    for i, row in enumerate(summary["layers"]):
        lines.append(
            f"{i:>5} " + " ".join(f"{row[m]:6.3f}" for m in MATRICES) + f" {row['layer']:6.3f}"
        )
    lines.append(f"overall decoder-linear sparsity: {summary['overall']:.4f}")
    return "\n".join(lines)


def save_masks(path: str, masks: Mapping) -> None:
    """Bit-packed masks, one entry per kernel path ('/'-joined), in a compressed .npz."""
    arrays = {}
    for p, m in _iter_leaves(masks):
        m = np.asarray(m, bool)
        arrays["/".join(p)] = np.packbits(m.reshape(-1))
        arrays["/".join(p) + ":shape"] = np.asarray(m.shape, np.int64)
    np.savez_compressed(path, **arrays)


def load_masks(path: str) -> dict:
    with np.load(path) as z:
        masks: dict = {}
        for k in z.files:
            if k.endswith(":shape"):
                continue
            shape = tuple(z[k + ":shape"])
            bits = np.unpackbits(z[k])[: int(np.prod(shape))].astype(bool).reshape(shape)
            masks = set_path(masks, tuple(k.split("/")), jnp.asarray(bits))
    return masks


def tree_size(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))

"""Search settings: one frozen dataclass whose fields are their own declaration; the recipes
(configs/*.yaml, shipped in the package), the command line's `--set KEY=VALUE`, the ablations.

Each field is declared once, by `setting(default, help, ...)`: its type is the annotation (bool,
int, float, str, None, list[...], tuple[..., ...], dict[str, ...] and unions of these, nested),
its valid values are `ge` / `gt` / `le` / `lt` for numbers (applied to every number inside a
list or mapping) or `choices` for strings, `path=True` marks a file or folder. From that
declaration come the checks of every SearchSettings however it is built (a recipe, `--set`,
Python), the `--set` parser, and the list of settings in `ellava search --help`
(`describe_settings`). Unknown keys are refused by name, with the closest known ones; every
error names the key and the value, and the recipe file or the `--set` argument it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import numbers
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file


class SettingError(UserError):
    """A search setting with a value of the wrong type or out of range; `key` names it,
    `problem` says what is wrong (the message without the key and value)."""

    def __init__(self, key: str, message: str, problem: str | None = None, others=()):
        super().__init__(message)
        self.key = key
        self.problem = problem or message
        self.others = tuple(others)  # further settings a cross-setting rule involves


class UnknownSetting(UserError):
    """A key that is not a search setting; the message names it and the closest known ones."""


# ---------------------------------------------------------------------------------------------
# the declaration


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    path: bool = False,
) -> Any:
    """One search setting: its default, one line of help and its valid values.

    ge / gt / le / lt bound numbers (>=, >, <=, <); `choices` lists a string's allowed values;
    `path` marks a file or folder (an empty string is refused). The type is the annotation.
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("setting(): give at most one lower (ge/gt) and one upper (le/lt) bound")
    lo, lo_open = (gt, True) if gt is not None else (ge, False)
    hi, hi_open = (lt, True) if lt is not None else (le, False)
    meta = {
        "help": help,
        "range": None if lo is None and hi is None else (lo, lo_open, hi, hi_open),
        "choices": tuple(choices) if choices is not None else None,
        "path": path,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class SearchSettings:
    # what to prune
    model: str = setting(
        "toy",
        "toy | tiny | tiny-llama | smollm2 | an HF LLaVA or LlamaForCausalLM directory",
        path=True,
    )
    p0: float = setting(0.5, "target mean sparsity of the decoder linears", gt=0, lt=1)
    granularity: str = setting(
        "layer", "one sparsity per decoder layer, or per matrix", choices=("layer", "matrix")
    )
    step: float = setting(0.05, "grid step of the sparsity levels", gt=0)
    width: float = setting(0.1, "the grid is p0 - width : step : p0 + width", ge=0)
    tol: float = setting(0.01, "every candidate's mean sparsity lies within p0 +- tol", ge=0)
    # evolution
    strategy: str = setting("ga", "evolution strategy (evosax)", choices=("ga", "cmaes"))
    population: int = setting(16, "candidates per round", ge=2)
    rounds: int = setting(10, "search rounds (0: no search, the `baseline` row alone)", ge=0)
    baseline: str = setting(
        "uniform",
        "what rounds 0 prunes with: uniform (SparseGPT at p0) or owl (OWL's continuous layer "
        "sparsities, mean p0, then SparseGPT)",
        choices=("uniform", "owl"),
    )
    owl_m: float = setting(5.0, "OWL: outliers are Wanda scores above M x their layer mean", gt=0)
    owl_lambda: float = setting(0.08, "OWL: layer sparsities spread over 2 x lambda", ge=0, lt=0.5)
    top_k: int = setting(
        8, "candidates kept per round (GA elites) and used to train the projector", ge=1
    )
    neighbors: int = setting(5, "nearest neighbours in c_m (eq. 7)", ge=1)
    init_std: float = setting(
        1.0, "mutation std (GA) / initial sigma (CMA-ES), in grid steps", gt=0
    )
    # fitness
    eta: float = setting(0.5, "weight of the generalization term G (0: 'Auto w/o Gen')", ge=0)
    fitness_loss: str = setting(
        "lm", "lm (next-token loss) | kl (to the dense model)", choices=("lm", "kl")
    )
    g_reading: str = setting(
        "sum",
        "G over the pruned matrices: sum (the paper's log of a product; grows with depth) | "
        "mean (per matrix; does not grow with depth, so eta needs another scale)",
        choices=("sum", "mean"),
    )
    # staged selection (EvoPress's multi-step selection)
    selection: str = setting(
        "full",
        "full: every candidate reads the whole proxy (the paper) | staged: every candidate reads "
        "the first stage's share of the proxy, the best move on to larger shares "
        "(stage_shares, stage_survivors)",
        choices=("full", "staged"),
    )
    stage_shares: list[float] = setting(
        [0.03125, 0.5],
        "staged: the share of the proxy's samples each stage reads, increasing (nested slices "
        "drawn once from the seed; 1: the whole proxy)",
        gt=0,
        le=1,
    )
    stage_survivors: list[int] = setting(
        [1],
        "staged: how many candidates move on to each later stage, decreasing (one number "
        "fewer than stage_shares)",
        ge=1,
    )
    # search-space evolution (projector training)
    projector_steps: int = setting(20, "projector training steps per round (0: 'No Evo')", ge=0)
    projector_lr: float = setting(1e-4, "projector learning rate", gt=0)
    projector_mass: float = setting(
        0.999, "train on the candidates holding this share of c_m (1: all)", gt=0, le=1
    )
    projector_loss: str = setting(
        "kl", "kl to the dense model (label-free) | lm", choices=("lm", "kl")
    )
    projector_samples: int | None = setting(
        None,
        "multimodal samples each projector step trains on (a fixed permutation from the seed, "
        "taken in turn: every sample as often); null: all of them every step",
        ge=1,
    )
    weighting: str = setting(
        "neighbors",
        "neighbors (c_m, eq. 7) | uniform ('Evo w/o UB')",
        choices=("neighbors", "uniform"),
    )
    # proxy data (paper: 64 segments x 256 tokens of PTB)
    proxy_text: str | None = setting(
        None,
        "local text / jsonl file, or bible (a named source, not a path: the World English "
        "Bible's Old Testament; a file named bible is ./bible); null: the model's own (toy, tiny)",
        path=True,
    )
    proxy_segments: int = setting(64, "proxy text segments", ge=1)
    proxy_seq_len: int = setting(256, "tokens per proxy segment", ge=2)
    proxy_multimodal: str | None = setting(
        None, "jsonl of image + text records; null: the model's own", path=True
    )
    proxy_multimodal_samples: int = setting(32, "multimodal samples for the projector", ge=1)
    calib_batch_size: int = setting(8, "calibration batch size", ge=1)
    database_storage: str = setting(
        "device", "where the level database lives", choices=("device", "host")
    )
    streaming: bool = setting(False, "the population streams layer by layer (big models)")
    row_chunk: int | None = setting(
        None,
        "proxy rows per block of each decoder layer and of the head, in the fitness and the "
        "projector step (activations, attention scores and logits exist for one block at a "
        "time); null: a whole part at once",
        ge=1,
    )
    candidate_chunk: int | None = setting(
        None,
        "candidates per block of each decoder layer, in the fitness and the projector step; "
        "null: every candidate at once",
        ge=1,
    )
    projector_offload: bool = setting(
        False,
        "the streamed projector step keeps each layer's input for its backward pass in host "
        "memory, not on the device (needs streaming)",
    )
    mesh: str | None = setting(
        None,
        "device mesh as axis=size pairs, e.g. data=2,model=4 (data: candidates and rows; "
        "model: the decoder's weights and level stacks); null: every device on data",
    )
    # evaluation of the result (toy test split by default)
    eval_data: str | None = setting(
        None, "multiple-choice jsonl; null: the model's own test split", path=True
    )
    eval_limit: int | None = setting(None, "evaluate the first N questions; null: all", ge=1)
    image_root: str | None = setting(
        None,
        "the folder images of proxy_multimodal / eval_data may come from; null: each jsonl's own",
        path=True,
    )
    seed: int = setting(0, "random seed", ge=0)

    def __post_init__(self):
        check_fields(self)
        if self.top_k > self.population:
            raise SettingError(
                "top_k",
                f"search setting top_k={self.top_k} exceeds population={self.population}",
                f"exceeds population={self.population}",
                others=("population",),
            )
        rows = max(self.proxy_segments, self.proxy_multimodal_samples)
        if self.row_chunk is not None and self.row_chunk > rows:
            raise SettingError(
                "row_chunk",
                f"search setting row_chunk={self.row_chunk} exceeds the proxy's rows "
                f"(proxy_segments={self.proxy_segments}, proxy_multimodal_samples="
                f"{self.proxy_multimodal_samples}): a chunk must be at most a part's rows",
                f"exceeds the proxy's {rows} rows",
                others=("proxy_segments", "proxy_multimodal_samples"),
            )
        self._check_stages()
        if self.candidate_chunk is not None and self.candidate_chunk > self.population:
            raise SettingError(
                "candidate_chunk",
                f"search setting candidate_chunk={self.candidate_chunk} exceeds population="
                f"{self.population}: a block must be at most the population",
                f"exceeds population={self.population}",
                others=("population",),
            )
        for key, value, why in (
            (
                "database_storage",
                self.database_storage == "host",
                "host storage is read one "
                "layer at a time; unstreamed, every pass would copy the whole database",
            ),
            (
                "projector_offload",
                self.projector_offload,
                "only the streamed projector step keeps layer inputs it could move to the host",
            ),
        ):
            if value and not self.streaming:
                shown = self.database_storage if key == "database_storage" else "true"
                raise SettingError(
                    key,
                    f"search setting {key}={shown} needs streaming=true ({why})",
                    f"needs streaming=true ({why})",
                    others=("streaming",),
                )
        if self.mesh is not None:
            from ellava_jax.mesh import parse_mesh

            try:
                parse_mesh(self.mesh)
            except UserError as e:
                raise SettingError(
                    "mesh", f"search setting mesh={self.mesh!r}: {e}", str(e)
                ) from None
        if self.model == "tiny":
            for k in ("proxy_text", "proxy_multimodal", "eval_data"):
                if getattr(self, k):
                    problem = (
                        "model 'tiny' has no tokenizer (it draws random proxy samples and is "
                        f"not evaluated); remove {k} or search 'toy' or an HF LLaVA directory"
                    )
                    raise SettingError(
                        k,
                        f"search setting {k}={getattr(self, k)!r}: {problem}",
                        problem,
                        others=("model",),
                    )

    def _check_stages(self) -> None:
        shares, survivors = self.stage_shares, self.stage_survivors

        def refuse(key, problem):
            value = getattr(self, key)
            raise SettingError(
                key,
                f"search setting {key}={value!r}: {problem}",
                problem,
                others=("stage_shares", "stage_survivors", "population"),
            )

        if not shares:
            refuse("stage_shares", "needs at least one share")
        if any(b <= a for a, b in zip(shares, shares[1:])):
            refuse("stage_shares", "the shares must increase from stage to stage")
        if len(survivors) != len(shares) - 1:
            refuse(
                "stage_survivors",
                f"needs {len(shares) - 1} numbers (one per stage after the first of "
                f"stage_shares={shares!r})",
            )
        if any(b >= a for a, b in zip(survivors, survivors[1:])):
            refuse("stage_survivors", "the survivors must decrease from stage to stage")
        if survivors and survivors[0] >= self.population:
            refuse(
                "stage_survivors",
                f"the first stage's survivors must be fewer than population={self.population}",
            )

    def stages(self) -> list[tuple[float, int]]:
        """(share of the proxy, candidates scored) per stage: staged selection's, or the one
        full stage (share 1, the whole population)."""
        if self.selection != "staged":
            return [(1.0, self.population)]
        counts = [self.population, *self.stage_survivors]
        return list(zip(self.stage_shares, counts))

    def replace(self, **kw) -> SearchSettings:
        check_keys(kw, "replace()", type(self))
        return dataclasses.replace(self, **kw)


# The paper's ablations (Tables 1-2), as changes to a recipe; `ellava search --ablation`.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "auto_wo_gen": {"eta": 0.0},
    "no_evo": {"projector_steps": 0},
    "evo_wo_ub": {"weighting": "uniform"},
    "uniform": {"rounds": 0},  # no search: uniform SparseGPT at p0
    "owl": {"rounds": 0, "baseline": "owl"},  # no search: OWL's layer sparsities, SparseGPT
}


# ---------------------------------------------------------------------------------------------
# types and valid values, from the declaration


# The functions below take the declared dataclass (`cls`, SearchSettings by default), so that a
# settings class of another command, or a test's, is checked by the same code.


@functools.cache
def _hints(cls=None) -> dict:
    return typing.get_type_hints(cls or SearchSettings)


def check_fields(obj) -> None:
    """Checks every field of a dataclass declared with `setting()` against its declaration,
    and stores the converted value (an int where a float goes becomes a float)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _checked(f, getattr(obj, f.name), hints[f.name]))


def declarations(cls=None) -> dict[str, dict]:
    """Every setting: {name: {"type", "type_text", "default", "help", "range", "choices",
    "path"}}, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls or SearchSettings):
        ann = _hints(cls or SearchSettings)[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = {
            "type": ann,
            "type_text": _type_text(ann),
            "default": default,
            **{k: f.metadata.get(k) for k in ("help", "range", "choices", "path")},
        }
    return out


def _options(ann) -> tuple:
    if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
        return typing.get_args(ann)
    return (ann,)


def _type_text(ann) -> str:
    parts = []
    for t in _options(ann):
        origin, args = typing.get_origin(t), typing.get_args(t)
        if t is type(None):
            parts.append("null")
        elif origin in (list, tuple):
            parts.append(f"list[{_type_text(args[0])}]")
        elif origin is dict:
            parts.append(f"mapping[{_type_text(args[0])}: {_type_text(args[1])}]")
        else:
            parts.append(t.__name__)
    return " | ".join(parts)


def _supported(ann) -> bool:
    for t in _options(ann):
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is list:
            ok = len(args) == 1 and _supported(args[0])
        elif origin is tuple:
            ok = len(args) == 2 and args[1] is Ellipsis and _supported(args[0])
        elif origin is dict:
            ok = len(args) == 2 and args[0] is str and _supported(args[1])
        else:
            ok = t in (bool, int, float, str, type(None))
        if not ok:
            return False
    return True


def _has_numbers(ann) -> bool:
    return any(
        t in (int, float) or any(_has_numbers(a) for a in typing.get_args(t) if a is not Ellipsis)
        for t in _options(ann)
    )


def _has_strings(ann) -> bool:
    return any(
        t is str
        or any(_has_strings(a) for a in [a for a in typing.get_args(t) if a is not Ellipsis][-1:])
        for t in _options(ann)
    )


def check_declarations(cls=None) -> None:
    """Every field is declared by `setting()`: a supported type, help, a range for numbers,
    choices only on strings. Raises TypeError (a programming error) otherwise."""
    cls = cls or SearchSettings
    for name, d in declarations(cls).items():
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        where = f"{cls.__name__}.{name}"
        if "help" not in f.metadata or not d["help"]:
            raise TypeError(f"{where}: declare it with setting(default, help, ...)")
        if not _supported(d["type"]):
            raise TypeError(f"{where}: unsupported type {d['type']}")
        if _has_numbers(d["type"]) and d["range"] is None:
            raise TypeError(f"{where}: a number needs a range (ge/gt/le/lt)")
        if d["choices"] is not None and not _has_strings(d["type"]):
            raise TypeError(f"{where}: choices are for strings")


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


class _Misfit(Exception):
    def __init__(self, where: str, text: str):
        self.where, self.text = where, text


def _kind(value) -> type | None:
    if value is None:
        return type(None)
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool
    if isinstance(value, numbers.Integral):
        return int
    if isinstance(value, numbers.Real):
        return float
    if isinstance(value, str):
        return str
    if isinstance(value, list | tuple):
        return list
    if isinstance(value, Mapping):
        return dict
    return None


def _accepts(t, kind) -> bool:
    origin = typing.get_origin(t) or t
    if origin in (list, tuple):
        origin = list
    return origin is kind or (origin is float and kind is int)


def _wanted(ann) -> str:
    names = []
    for t in _options(ann):
        origin = typing.get_origin(t)
        if t is type(None):
            names.append("null")
        elif origin in (list, tuple):
            names.append(f"a list of {_type_text(typing.get_args(t)[0])}")
        elif origin is dict:
            names.append("a mapping")
        else:
            names.append(_TYPE_NAMES[t])
    return " or ".join(names)


def _fit(value, ann, where: str):
    """`value` converted to `ann` (an int where a float goes becomes a float; lists become
    tuples for tuple types); else _Misfit naming where inside the value."""
    kind = _kind(value)
    for t in _options(ann):
        if kind is None or not _accepts(t, kind):
            continue
        origin, args = typing.get_origin(t), typing.get_args(t)
        if t is type(None):
            return None
        if t is bool:
            return bool(value)
        if t is int:
            return int(value)
        if t is float:
            return float(value)
        if t is str:
            return value
        if origin in (list, tuple):
            items = [_fit(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _Misfit(f"{where} key {k!r}", "expected a string key")
                out[k] = _fit(v, args[1], f"{where}.{k}")
            return out
    hint = ""
    if kind is str and any(t is float for t in _options(ann)):
        try:
            float(value)
            hint = f" (YAML reads {value} as text; write it with a dot, e.g. 1.0e-4)"
        except ValueError:
            pass
    got = "null" if value is None else type(value).__name__
    raise _Misfit(where, f"expected {_wanted(ann)}, got {got}{hint}")


def _leaves(value, where: str):
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{where}.{k}")
    else:
        yield where, value


def _range_text(lo, lo_open, hi, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _checked(f: dataclasses.Field, value, ann):
    """One setting's value checked against its declaration: type, range or choices, path."""
    key, meta = f.name, f.metadata

    def fail(problem: str):
        return SettingError(key, f"search setting {key}={value!r}: {problem}", problem)

    try:
        out = _fit(value, ann, key)
    except _Misfit as m:
        raise fail(m.text if m.where == key else f"{m.where}: {m.text}") from None
    for where, leaf in _leaves(out, key):
        at = "" if where == key else f"{where} "
        if isinstance(leaf, int | float) and not isinstance(leaf, bool) and meta.get("range"):
            lo, lo_open, hi, hi_open = meta["range"]
            bad = (
                (isinstance(leaf, float) and not math.isfinite(leaf))
                or (lo is not None and (leaf <= lo if lo_open else leaf < lo))
                or (hi is not None and (leaf >= hi if hi_open else leaf > hi))
            )
            if bad:
                raise fail(f"{at}must be {_range_text(lo, lo_open, hi, hi_open)}")
        if isinstance(leaf, str) and meta.get("choices") and leaf not in meta["choices"]:
            raise fail(f"{at}expected one of {meta['choices']}")
        if isinstance(leaf, str) and meta.get("path") and leaf == "":
            raise fail(f"{at}expected a path or null")
    return out


# ---------------------------------------------------------------------------------------------
# keys and the command line


def setting_names(cls=None) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls or SearchSettings))


def check_keys(keys: Iterable, where: str, cls=None) -> None:
    """Refuses keys that are not settings, naming them and the closest known ones."""
    names = setting_names(cls)
    unknown = sorted(str(k) for k in set(keys) - set(names))
    if not unknown:
        return
    close = {k: difflib.get_close_matches(k, names, n=3, cutoff=0.6) for k in unknown}
    if len(unknown) == 1 and close[unknown[0]]:
        tail = f"; did you mean {' or '.join(close[unknown[0]])}?"
    elif any(close.values()):
        tail = "; closest known: " + ", ".join(
            f"{k} -> {' or '.join(c)}" for k, c in close.items() if c
        )
    else:
        tail = ""
    raise UnknownSetting(
        f"{where}: unknown setting(s) {unknown}{tail} (`ellava search --help` lists them)"
    )


def _admits(ann, t) -> bool:
    return any(o is t for o in _options(ann))


_NULLS = ("null", "Null", "NULL", "~")


def parse_value(key: str, text: str, origin: str, cls=None):
    """The value of `--set KEY=TEXT` (or of a dedicated flag). For a setting that takes a
    string (a path, a choice), TEXT as it is (a folder named `2024` or `runs #1` stays so),
    or null; otherwise TEXT read as YAML (0.6, true, null, [1, 2], {data: 2}), and for a
    number 1e-4 as well (YAML 1.1 reads it as text)."""
    check_keys([key], origin, cls)
    if text.strip() == "":
        raise UserError(f"{origin}: no value (write null for none)")
    ann = _hints(cls or SearchSettings)[key]
    if [t for t in _options(ann) if t is not type(None)] == [str]:
        return None if text.strip() in _NULLS else text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{origin}: not a YAML value ({first})") from None
    if isinstance(value, str):
        for convert in (int, float):
            if _admits(ann, convert):
                try:
                    return convert(text.strip())
                except ValueError:
                    pass
    return value


def command_line_overrides(
    sets: Iterable[str] = (), flags: Mapping[str, str | None] | None = None, cls=None
) -> tuple[dict, dict]:
    """`--set KEY=VALUE` arguments and the dedicated flags ({"p0": "0.6"} for `--p0 0.6`, which
    is `--set p0=0.6`) -> (overrides, origins): origins[key] names the argument, for errors.
    A key given twice with different values is refused."""
    overrides: dict = {}
    origins: dict = {}
    items = [
        (f"--{k.replace('_', '-')} {v}", k, v) for k, v in (flags or {}).items() if v is not None
    ]
    for arg in sets:
        key, eq, text = arg.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"--set {arg}: expected KEY=VALUE, e.g. --set p0=0.6")
        items.append((f"--set {arg}", key, text))
    for origin, key, text in items:
        value = parse_value(key, text, origin, cls)
        if key in overrides and overrides[key] != value:
            raise UserError(f"{key} is given twice: {origins[key]} and {origin}")
        overrides[key], origins[key] = value, origin
    return overrides, origins


def describe_settings(width: int = 100, cls=None) -> str:
    """Every setting with its type, valid values, default and help (`ellava search --help`)."""
    lines = []
    for name, d in declarations(cls).items():
        valid = ""
        if d["range"]:
            valid = f" {_range_text(*d['range'])}"
        elif d["choices"]:
            valid = f" ({' | '.join(d['choices'])})"
        default = d["default"]
        default = default if isinstance(default, str) else json.dumps(default)
        options = [t for t in _options(d["type"]) if t is not type(None)]
        nullable = len(options) < len(_options(d["type"]))
        kind = " | ".join(_type_text(t) for t in options) + valid + (" | null" if nullable else "")
        lines.append(f"  {name:<26}{kind}, default {default}")
        lines += textwrap.wrap(
            d["help"], width, initial_indent=" " * 28, subsequent_indent=" " * 28
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# recipes


def _recipes_dir() -> Path | None:
    """The shipped recipes: the `configs` package (the top-level configs/ folder, installed
    with the wheel); in a checkout whose editable install predates it, the folder itself.
    Another project's `configs` on the path (one without our toy.yaml) is passed over."""

    candidates = []
    try:
        spec = importlib.util.find_spec("configs")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and spec.origin.endswith("__init__.py"):
        candidates.append(Path(spec.origin).parent)
    candidates.append(Path(__file__).resolve().parents[2] / "configs")
    for d in candidates:
        if (d / "__init__.py").is_file() and (d / "toy.yaml").is_file():
            return d
    return None


def shipped_recipes() -> dict[str, str]:
    """{name: path} of the recipes shipped with the package (configs/*.yaml), e.g. "toy"."""
    d = _recipes_dir()
    if d is None:
        return {}
    return {p.stem: str(p) for p in sorted(d.glob("*.yaml"))}


def recipe_path(spec: str | os.PathLike) -> str:
    """A recipe file: `spec` where it names a file, else a shipped recipe's name ("toy",
    "toy.yaml"); a missing one is an error that lists the shipped names."""

    spec = os.fspath(spec)
    shipped = shipped_recipes()
    name = spec.removesuffix(".yaml").removesuffix(".yml")
    if not os.path.lexists(spec) and os.sep not in spec and "/" not in spec and name in shipped:
        return shipped[name]
    names = ", ".join(shipped) or "none found"
    return check_file(
        spec, "search config", missing=f"no such search config (shipped recipes: {names})"
    )


def load_settings(
    path: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    /,
    *,
    origins: Mapping[str, str] | None = None,
    **more,
) -> SearchSettings:
    """A YAML recipe (a path or a shipped recipe's name) -> SearchSettings; `overrides` (and
    keyword overrides) win over the file; `origins[key]` names where an override came from
    (`--set p0=0.6`), for the errors.

    Every error names the file and the setting: a missing or empty file, a key that is not a
    setting (with the closest known ones), a value of the wrong type or out of range.
    """
    path = recipe_path(path)
    overrides = {**(overrides or {}), **more}
    origins = dict(origins or {})
    check_keys(overrides, f"overriding {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            raise UserError(f"{where}: not valid YAML ({first})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if raw is None:
        raise UserError(f"{path}: empty search config (no settings); see configs/*.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    check_keys(raw, path)
    try:
        return SearchSettings(**{**raw, **overrides})
    except SettingError as e:
        for k in (e.key, *e.others):
            if k in origins:
                problem = e.problem if k == e.key else str(e)
                raise SettingError(e.key, f"{origins[k]}: {problem} (overriding {path})") from None
        if e.key in overrides:
            raise SettingError(e.key, f"{e} (overriding {path})") from None
        raise SettingError(e.key, f"{path}: {e}") from None


check_declarations()

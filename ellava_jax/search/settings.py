"""Search settings: one frozen dataclass, loaded from a YAML recipe in configs/, and the ablations.

Unknown keys in a recipe are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass

import yaml

from ellava_jax.errors import UserError


class SettingError(UserError):
    """A search setting with a value of the wrong type or out of range; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class SearchSettings:
    # what to prune
    model: str = "toy"  # toy | tiny | HF LLaVA directory
    p0: float = 0.5  # target mean sparsity of the decoder linears
    granularity: str = "layer"  # one sparsity per decoder layer, or per "matrix"
    step: float = 0.05
    width: float = 0.1  # grid p0 - width : step : p0 + width
    tol: float = 0.01  # every candidate's mean sparsity within p0 +- tol
    # evolution
    strategy: str = "ga"  # ga | cmaes
    population: int = 16
    rounds: int = 10
    top_k: int = 8  # candidates kept per round (GA elites) and used to train the projector
    neighbors: int = 5  # nearest neighbours in c_m
    init_std: float = 1.0  # mutation std (GA) / initial sigma (CMA-ES), in grid steps
    # fitness
    eta: float = 0.5  # weight of the generalization term G; 0 = "Auto w/o Gen"
    fitness_loss: str = "lm"  # lm (next-token loss) | kl (to the dense model)
    # search-space evolution (projector training)
    projector_steps: int = 20  # 0 = "No Evo"
    projector_lr: float = 1e-4
    projector_mass: float = 0.999  # train on the candidates holding this share of c_m (1 = all)
    projector_loss: str = "kl"  # kl to the dense model (label-free) | lm
    weighting: str = "neighbors"  # neighbors (c_m, eq. 7) | uniform ("Evo w/o UB")
    # proxy data (paper: 64 segments x 256 tokens of PTB)
    proxy_text: str | None = None  # local text / jsonl file; None = the model's own (toy, tiny)
    proxy_segments: int = 64
    proxy_seq_len: int = 256
    proxy_multimodal: str | None = None  # jsonl of image + text records; None = the model's own
    proxy_multimodal_samples: int = 32
    calib_batch_size: int = 8
    database_storage: str = "device"  # device | host
    streaming: bool = False  # population streams layer by layer (big models)
    # evaluation of the result (toy test split by default)
    eval_data: str | None = None  # jsonl; None = the model's own test split
    eval_limit: int | None = None
    # the folder images of proxy_multimodal / eval_data may come from; None: each jsonl's own
    image_root: str | None = None
    seed: int = 0

    def __post_init__(self):
        hints = _hints()
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for f in dataclasses.fields(self):
            value = _checked_type(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        checks = {
            "granularity": ("layer", "matrix"),
            "strategy": ("ga", "cmaes"),
            "fitness_loss": ("lm", "kl"),
            "projector_loss": ("lm", "kl"),
            "weighting": ("neighbors", "uniform"),
            "database_storage": ("device", "host"),
        }
        for k, allowed in checks.items():
            if getattr(self, k) not in allowed:
                raise SettingError(
                    k, f"search setting {k}={getattr(self, k)!r}: expected one of {allowed}"
                )
        for k, (lo, lo_open, hi, hi_open) in _RANGES.items():
            v = getattr(self, k)
            if v is None:
                continue
            bad = (
                (isinstance(v, float) and not math.isfinite(v))
                or (lo is not None and (v <= lo if lo_open else v < lo))
                or (hi is not None and (v >= hi if hi_open else v > hi))
            )
            if bad:
                raise SettingError(
                    k,
                    f"search setting {k}={given[k]!r}: must be "
                    f"{_range_text(lo, lo_open, hi, hi_open)}",
                )
        for k in ("model", *_PATHS):
            if getattr(self, k) == "":
                raise SettingError(k, f"search setting {k}='': expected a path or null")
        if self.top_k > self.population:
            raise SettingError(
                "top_k", f"search setting top_k={self.top_k} exceeds population={self.population}"
            )
        if self.model == "tiny":
            for k in _PATHS:
                if k != "image_root" and getattr(self, k):
                    raise SettingError(
                        k,
                        f"search setting {k}={getattr(self, k)!r}: model 'tiny' has no tokenizer "
                        f"(it draws random proxy samples and is not evaluated); remove {k} or "
                        "search 'toy' or an HF LLaVA directory",
                    )

    def replace(self, **kw) -> SearchSettings:
        return dataclasses.replace(self, **kw)


# Numeric ranges: (low, low excluded, high, high excluded); None = unbounded.
_RANGES: dict[str, tuple] = {
    "p0": (0.0, True, 1.0, True),
    "step": (0.0, True, None, False),
    "width": (0.0, False, None, False),
    "tol": (0.0, False, None, False),
    "population": (2, False, None, False),
    "rounds": (0, False, None, False),
    "top_k": (1, False, None, False),
    "neighbors": (1, False, None, False),
    "init_std": (0.0, True, None, False),
    "eta": (0.0, False, None, False),
    "projector_steps": (0, False, None, False),
    "projector_lr": (0.0, True, None, False),
    "projector_mass": (0.0, True, 1.0, False),
    "proxy_segments": (1, False, None, False),
    "proxy_seq_len": (2, False, None, False),
    "proxy_multimodal_samples": (1, False, None, False),
    "calib_batch_size": (1, False, None, False),
    "eval_limit": (1, False, None, False),
    "seed": (0, False, None, False),
}

# Settings that name files or folders.
_PATHS = ("proxy_text", "proxy_multimodal", "eval_data", "image_root")


def _range_text(lo, lo_open, hi, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(SearchSettings)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _checked_type(key: str, value, annotation):
    """`value` if it fits `annotation` (int for float allowed, as a float); else SettingError."""
    options = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"
    for t in options:
        if t is type(None) and value is None:
            return None
        if t is bool and is_bool:
            return bool(value)
        if t is int and isinstance(value, numbers.Integral) and not is_bool:
            return int(value)
        if t is float and isinstance(value, numbers.Real) and not is_bool:
            return float(value)
        if t is str and isinstance(value, str):
            return value
    wanted = " or ".join("null" if t is type(None) else _TYPE_NAMES[t] for t in options)
    raise SettingError(
        key, f"search setting {key}={value!r}: expected {wanted}, got {type(value).__name__}"
    )


# The paper's ablations (Tables 1-2), as changes to a recipe.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "auto_wo_gen": {"eta": 0.0},
    "no_evo": {"projector_steps": 0},
    "evo_wo_ub": {"weighting": "uniform"},
    "uniform": {"rounds": 0},  # no search: uniform SparseGPT at p0
}


def load_settings(path: str, **overrides) -> SearchSettings:
    """A YAML recipe -> SearchSettings; `overrides` win over the file.

    Every error names the file and the setting: a missing or empty file, a key that is not a
    setting, a value of the wrong type or out of range.
    """
    from ellava_jax.inputs import check_file

    check_file(path, "search config")
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
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    unknown = sorted(str(k) for k in set(raw) - fields)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {unknown}")
    try:
        return SearchSettings(**{**raw, **overrides})
    except SettingError as e:
        if e.key in overrides:
            raise SettingError(e.key, f"{e} (overriding {path})") from None
        raise SettingError(e.key, f"{path}: {e}") from None

"""Search settings: one frozen dataclass, loaded from a YAML recipe in configs/, and the ablations.

Unknown keys in a recipe are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import yaml


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
    seed: int = 0

    def __post_init__(self):
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
                raise ValueError(
                    f"search setting {k}={getattr(self, k)!r}: expected one of {allowed}"
                )
        if self.top_k > self.population:
            raise ValueError(f"top_k={self.top_k} exceeds population={self.population}")

    def replace(self, **kw) -> SearchSettings:
        return dataclasses.replace(self, **kw)


# The paper's ablations (Tables 1-2), as changes to a recipe.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "auto_wo_gen": {"eta": 0.0},
    "no_evo": {"projector_steps": 0},
    "evo_wo_ub": {"weighting": "uniform"},
    "uniform": {"rounds": 0},  # no search: uniform SparseGPT at p0
}


def load_settings(path: str, **overrides) -> SearchSettings:
    """A YAML recipe -> SearchSettings; `overrides` win over the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such search config")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}")
    try:
        return SearchSettings(**{**raw, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e

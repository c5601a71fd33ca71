"""benchmarks/proxy_fit.py reads the policies a real_model.py run found: the rows of one seed
and p0 whose per-layer sparsities lie on the search's grid and keep its budget, each policy
once (the scoring itself is the fitness, tested in test_search.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from ellava_jax.config import get_preset
from ellava_jax.search.policy import PolicySpace

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("proxy_fit", ROOT / "benchmarks" / "proxy_fit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_found_policies_keeps_valid_grid_policies_of_one_seed_once(tmp_path):
    space = PolicySpace(get_preset("tiny-llama"), 0.5, "layer")  # 2 layers, levels 0.4-0.6
    rows = [
        {"row": "dense", "p0": 0.0, "seed": -1, "perplexity": 10.0},
        {
            "row": "sparsegpt",
            "p0": 0.5,
            "seed": 0,
            "perplexity": 30.0,
            "layer_sparsities": [0.5, 0.5],
        },
        {
            "row": "search_kl",
            "p0": 0.5,
            "seed": 0,
            "perplexity": 25.0,
            "layer_sparsities": [0.45, 0.55],
        },
        {
            "row": "kl_staged_cheap",
            "p0": 0.5,
            "seed": 0,
            "perplexity": 26.0,
            "layer_sparsities": [0.45, 0.55],
        },  # the same policy: kept once, first row's
        {
            "row": "search_kl",
            "p0": 0.5,
            "seed": 1,
            "perplexity": 24.0,
            "layer_sparsities": [0.55, 0.45],
        },  # another seed
        {
            "row": "search_kl",
            "p0": 0.6,
            "seed": 0,
            "perplexity": 50.0,
            "layer_sparsities": [0.55, 0.65],
        },  # another p0
        {
            "row": "owl",
            "p0": 0.5,
            "seed": 0,
            "perplexity": 28.0,
            "layer_sparsities": [0.47, 0.53],
        },  # off the grid
        {
            "row": "magnitude",
            "p0": 0.5,
            "seed": 0,
            "perplexity": 90.0,
            "layer_sparsities": [0.4, 0.4],
        },  # on the grid, but not p0's budget
    ]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = _module().found_policies(space, str(runs), seed=0, p0=0.5)
    assert [f["row"] for f in found] == ["sparsegpt", "search_kl"]
    assert [f["perplexity"] for f in found] == [30.0, 25.0]
    np.testing.assert_array_equal(found[0]["policy"], [2, 2])
    np.testing.assert_array_equal(found[1]["policy"], [1, 3])

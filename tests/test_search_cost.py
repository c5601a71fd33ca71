"""What a search costs against one uniform SparseGPT prune (benchmarks/search_cost_model.py,
FLOPs from the recipe's sizes): the paper's selection, and the staged selection and cheaper
projector step that bring the 7B recipe under 10x (text) and 40x (with projector evolution)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ellava_jax.config import get_preset
from ellava_jax.search.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location(
        "search_cost_model", ROOT / "benchmarks" / "search_cost_model.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def ratio(**overrides) -> dict:
        s = load_settings(str(ROOT / "configs" / "llava-1.5-7b.yaml"), **overrides)
        config = get_preset("llava-1.5-7b")
        text, mm = mod.recipe_shapes(s, config)
        phases = mod.cost_model(s, config, text, mm, trained=4)
        uniform = phases.pop("uniform prune")
        return {k: v / uniform for k, v in phases.items()} | {
            "search": sum(phases.values()) / uniform
        }

    return ratio


def test_the_paper_selection_costs_what_the_issue_measured(cost):
    full = cost()
    assert full["search"] == pytest.approx(80.1, abs=0.1)
    mm = cost(proxy_multimodal="/data/mm.jsonl")
    assert mm["search"] == pytest.approx(578.2, abs=0.1)


def test_staged_selection_and_the_cheap_projector_step_meet_the_targets(cost):
    staged = cost(selection="staged")
    assert staged["search"] <= 10.0, staged
    mm = cost(
        selection="staged",
        proxy_multimodal="/data/mm.jsonl",
        projector_samples=8,
        projector_steps=4,
    )
    assert mm["search"] <= 40.0, mm
    # staging scores fewer tokens, never more: each stage's share of the full fitness
    assert staged["fitness"] < cost()["fitness"] / 10

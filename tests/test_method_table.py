"""The real-model table (`benchmarks/real_model.py` -> runs.jsonl -> `ellava report`): every
figure of table.md and report.md is computed from the rows the benchmark wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ellava_jax.cli import main
from ellava_jax.report import method_table as mt


def _row(row, p0, seed, ppl, layers=None, **kw):
    return {
        "key": f"{row}/p0={p0:g}/seed={seed}",
        "row": row,
        "p0": p0,
        "seed": seed,
        "perplexity": ppl,
        "measured_sparsity": p0,
        "layer_sparsities": layers or [p0] * 4,
        "wall_s": 10.0 + seed,
        "machine": "test cpu",
        **kw,
    }


def _rounds(loss_std, eta_g_std, rj_l, rj_g, nested=False):
    """Round logs with the population's terms at the top level, or nested under
    `population_terms` as the benchmark copies them from rounds.jsonl's `extra`."""
    out = []
    for k in range(2):
        terms = {
            "loss_std": loss_std[k],
            "eta_g_std": eta_g_std[k],
            "rank_corr_j_loss": rj_l[k],
            "rank_corr_j_g": rj_g[k],
        }
        out.append({"round": k, **({"population_terms": terms} if nested else terms)})
    return out


@pytest.fixture()
def bench_dir(tmp_path):
    rows = [
        _row("dense", 0.0, -1, 16.0, heldout={"source": "bible", "books": ["Matthew", "Mark"]})
        | {"key": "dense"},
        _row("magnitude", 0.7, 0, 900.0),
    ]
    for seed, (sg, owl, se) in enumerate([(100.0, 90.0, 70.0), (110.0, 95.0, 78.0)]):
        rows += [
            _row("sparsegpt", 0.7, seed, sg),
            _row("owl", 0.7, seed, owl, [0.62, 0.66, 0.74, 0.78]),
            _row(
                "search",
                0.7,
                seed,
                se,
                [0.6, 0.7, 0.7, 0.8],
                rounds=_rounds([0.2, 0.02], [0.1, 0.05], [0.9, 0.3], [0.5, 0.8], nested=seed == 1),
            ),
        ]
    rows.append(_row("search_mean", 0.7, 0, 80.0, eta=14.0))
    rows.append(_row("sparsegpt", 0.7, 1, 108.0))  # a rerun line replaces the earlier one
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_summary_is_mean_and_sample_std_over_seeds(bench_dir):
    s = mt.summarize(mt.read_runs(bench_dir))
    assert s["p0s"] == [0.7] and s["dense"] == 16.0
    se = s["rows"]["search"][0.7]
    assert se["perplexity"]["mean"] == pytest.approx(74.0)
    assert se["perplexity"]["std"] == pytest.approx(np.std([70.0, 78.0], ddof=1))
    # the ratio is taken per seed against the same seed's uniform SparseGPT (the rerun's 108)
    assert se["vs_sparsegpt"]["mean"] == pytest.approx(np.mean([70 / 100, 78 / 108]))
    assert s["rows"]["sparsegpt"][0.7]["perplexity"]["mean"] == pytest.approx(104.0)
    assert s["rows"]["magnitude"][0.7]["perplexity"]["n"] == 1


def test_report_renders_the_table_verdict_terms_and_plot(bench_dir):
    assert main(["report", str(bench_dir)]) == 0
    table = (bench_dir / "table.md").read_text()
    assert "| EfficientLLaVA search (eta 0.5, G summed) | 74.00 +- 5.66 (n=2) |" in table
    assert "| Uniform magnitude | 900.00 (n=1) |" in table
    report = (bench_dir / "report.md").read_text()
    # OWL 92.5 +- 3.54 against the search 74 +- 5.66: a gap of 18.5 beats the spread
    assert "OWL - search = +18.50 against a seed spread of 5.66 (beats OWL" in report
    assert f"{np.mean([70 / 100, 78 / 108]):.3f}x uniform SparseGPT (within" in report
    assert "| search | 0.7 | 2 | 0.020 | 0.050 | 0.300 | 0.800 |" in report
    assert "Matthew, Mark" in report and "test cpu" in report
    # the mean-reading row names its eta; one seed has no spread to compare with
    assert "| EfficientLLaVA search (G as a mean over matrices, eta 14) | 80.00 (n=1) |" in table
    assert "OWL - search = +12.50 (one seed: no spread to compare)" in report
    assert (bench_dir / "layers.png").stat().st_size > 1000


def test_report_names_the_recipe_settings_the_rows_changed(bench_dir):
    runs = [json.loads(x) for x in (bench_dir / "runs.jsonl").read_text().splitlines()]
    assert mt.override_lines(runs) == []  # the shipped recipe: nothing to say
    same = [r | {"recipe_overrides": {"proxy_segments": 64}} for r in runs]
    (bench_dir / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    assert main(["report", str(bench_dir)]) == 0
    report = (bench_dir / "report.md").read_text()
    assert "Recipe settings changed for every row: proxy_segments=64." in report
    mixed = same[:-1] + [runs[-1]]  # one row without the override
    lines = mt.override_lines(mixed)
    assert lines[0].startswith("Recipe settings changed per row")
    assert f"- none: {runs[-1]['key']}" in lines


def test_real_model_bad_set_is_one_line_and_writes_nothing(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    for arg, says in [
        ("proxy_segments=0", "--set proxy_segments=0: must be >= 1"),
        ("bogus=1", "--set bogus=1: unknown setting(s) ['bogus']"),
        ("proxy_segments", "--set proxy_segments: expected KEY=VALUE"),
    ]:
        p = subprocess.run(
            [sys.executable, str(root / "benchmarks" / "real_model.py"), "--out", str(out)]
            + ["--set", arg, "--seeds", "0", "--rows", "sparsegpt"],
            capture_output=True,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"real_model.py: error: {says}"), p.stderr
        assert not out.exists()  # nothing written before the settings were checked

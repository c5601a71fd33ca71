"""The pruning-method table of a real model (`benchmarks/real_model.py`), from its runs.jsonl.

Each line of runs.jsonl is one measured row: `row` (dense, magnitude, wanda, sparsegpt, owl,
search, search_kl, search_mean), `p0`, `seed`, held-out `perplexity`, `measured_sparsity`,
`layer_sparsities`, `wall_s`, and for a search its `rounds` (with the population's term
spreads). Nothing here is typed in: `write_outputs(dir)` writes table.md, layers.png and
report.md from that file alone, and `ellava report DIR` calls it for such a directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

RUNS_FILE = "runs.jsonl"

ROW_NAMES = {
    "dense": "Dense (the 4-bit GGUF, dequantised)",
    "magnitude": "Uniform magnitude",
    "wanda": "Uniform Wanda",
    "sparsegpt": "Uniform SparseGPT",
    "owl": "OWL + SparseGPT",
    "search": "EfficientLLaVA search (eta 0.5, G summed)",
    "search_kl": "Auto w/o Gen, KL loss (eta 0; EvoPress's objective)",
    "search_mean": "EfficientLLaVA search (G as a mean over matrices)",  # + its eta
    # the KL search with staged selection (candidates on a share of the proxy, stage by stage)
    "kl_staged_cheap": "KL search, staged: 16 on 1/32 of the proxy, 1 on 1/2",
    "kl_staged_mid": "KL search, staged: 16 on 1/8, 4 on 1/2, 1 on all",
    "kl_staged_generous": "KL search, staged: 16 on 1/4, 4 on all",
    "kl_staged_spend": "KL search, staged, 64 candidates x 16 rounds: 64 on 1/16, 8 on 1/2",
}
ORDER = tuple(ROW_NAMES)
SEARCH_ROWS = (
    "search",
    "search_kl",
    "search_mean",
    "kl_staged_cheap",
    "kl_staged_mid",
    "kl_staged_generous",
    "kl_staged_spend",
)


def is_method_table(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds this benchmark's runs.jsonl (rows with `row` and `perplexity`)."""
    path = Path(run_dir) / RUNS_FILE
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            return "row" in r and "perplexity" in r
    return False


def read_runs(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of runs.jsonl; a later line of the same key replaces an earlier one."""
    rows: dict[str, dict] = {}
    for line in (Path(run_dir) / RUNS_FILE).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["key"]] = r
    return list(rows.values())


def _cell(vals) -> dict:
    vals = [float(v) for v in vals]
    return {
        "n": len(vals),
        "mean": float(np.mean(vals)) if vals else None,
        "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
    }


def summarize(runs: list[dict]) -> dict:
    """{"p0s": [...], "rows": {row: {p0: cell}}} where a cell holds perplexity, measured
    sparsity, the ratio to uniform SparseGPT of the same seed and p0, and wall time, each as
    mean / sample std / n over seeds. Magnitude reads no data: its one seed stands for all."""
    p0s = sorted({r["p0"] for r in runs if r["row"] != "dense"})
    sgpt = {(r["p0"], r["seed"]): r["perplexity"] for r in runs if r["row"] == "sparsegpt"}
    out: dict = {"p0s": p0s, "rows": {}, "names": {row: row_name(row, runs) for row in ORDER}}
    dense = [r for r in runs if r["row"] == "dense"]
    if dense:
        out["dense"] = dense[0]["perplexity"]
        out["heldout"] = dense[0].get("heldout")
    for row in ORDER[1:]:
        cells = {}
        for p0 in p0s:
            rs = sorted(
                (r for r in runs if r["row"] == row and r["p0"] == p0), key=lambda r: r["seed"]
            )
            if not rs:
                continue
            ratios = [
                r["perplexity"] / sgpt[(p0, r["seed"])] for r in rs if (p0, r["seed"]) in sgpt
            ]
            cells[p0] = {
                "perplexity": _cell([r["perplexity"] for r in rs]),
                "measured_sparsity": _cell([r["measured_sparsity"] for r in rs]),
                "vs_sparsegpt": _cell(ratios),
                "wall_s": _cell([r["wall_s"] for r in rs]),
                "flop_ratio": _cell([r["flop_ratio"] for r in rs if "flop_ratio" in r]),
                "seeds": [r["seed"] for r in rs],
            }
        if cells:
            out["rows"][row] = cells
    return out


def _fmt(c: dict, digits: int = 2) -> str:
    if c["n"] == 0:
        return "-"
    if c["std"] is None:
        return f"{c['mean']:.{digits}f} (n=1)"
    return f"{c['mean']:.{digits}f} +- {c['std']:.{digits}f} (n={c['n']})"


def markdown_table(summary: dict) -> list[str]:
    """Held-out perplexity per row and p0 (mean +- sample std over seeds, n), then the measured
    sparsity, the ratio to uniform SparseGPT and the wall time of each cell."""
    p0s = summary["p0s"]
    lines = [
        "| method | " + " | ".join(f"p0 = {p:g}" for p in p0s) + " |",
        "| --- | " + " | ".join("---" for _ in p0s) + " |",
    ]
    if "dense" in summary:
        lines.append(
            f"| {ROW_NAMES['dense']} | " + " | ".join(f"{summary['dense']:.2f}" for _ in p0s) + " |"
        )
    for row, cells in summary["rows"].items():
        vals = [_fmt(cells[p]["perplexity"]) if p in cells else "-" for p in p0s]
        lines.append(f"| {summary['names'][row]} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "Each cell's measured mean sparsity of the decoder linears, its perplexity over uniform "
        "SparseGPT's at the same seed and p0, its wall time on this machine (a search: "
        "database + rounds + final re-prune; a baseline: its prune) and, for a search, its FLOPs "
        "over one uniform SparseGPT prune's (benchmarks/search_cost_model.py):",
        "",
        "| method | p0 | measured sparsity | / uniform SparseGPT | wall s | FLOPs / prune |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row, cells in summary["rows"].items():
        for p in p0s:
            if p in cells:
                c = cells[p]
                flops = _fmt(c["flop_ratio"], 1) if c.get("flop_ratio", {}).get("n") else "-"
                lines.append(
                    f"| {summary['names'][row]} | {p:g} | {_fmt(c['measured_sparsity'], 4)} | "
                    f"{_fmt(c['vs_sparsegpt'], 3)} | {_fmt(c['wall_s'], 0)} | {flops} |"
                )
    return lines


def verdict(summary: dict) -> list[str]:
    """The issue's targets, read from the numbers: does a search beat OWL by more than the seed
    spread, and is it at most 0.80x uniform SparseGPT?"""
    rows, lines = summary["rows"], []
    for row in SEARCH_ROWS:
        for p0, c in rows.get(row, {}).items():
            ppl, owl = c["perplexity"], rows.get("owl", {}).get(p0, {}).get("perplexity")
            parts = [f"{summary['names'][row]} at p0 {p0:g}:"]
            if owl and owl["n"] and ppl["n"]:
                gap = owl["mean"] - ppl["mean"]
                if ppl["n"] < 2 or owl["n"] < 2:
                    parts.append(f"OWL - search = {gap:+.2f} (one seed: no spread to compare);")
                else:
                    spread = max(ppl["std"], owl["std"])
                    beats = gap > spread
                    parts.append(
                        f"OWL - search = {gap:+.2f} against a seed spread of {spread:.2f} "
                        f"({'beats OWL' if beats else 'does not beat OWL by more than the spread'});"
                    )
            r = c["vs_sparsegpt"]
            if r["n"]:
                parts.append(
                    f"{r['mean']:.3f}x uniform SparseGPT "
                    f"({'within' if r['mean'] <= 0.80 else 'above'} the 0.80x target)."
                )
            lines.append("- " + " ".join(parts))
    return lines


def population_lines(runs: list[dict]) -> list[str]:
    """How each term of J spreads over the population, first and last round, mean over seeds:
    std of L and of eta*G, and the rank correlation of J with L and with G."""
    out = [
        "| search | p0 | round | std L | std eta*G | rank corr (J, L) | rank corr (J, G) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = sorted(
        {(r["row"], r["p0"]) for r in runs if r["row"] in SEARCH_ROWS and r.get("rounds")}
    )
    for row, p0 in keys:
        rs = [r for r in runs if r["row"] == row and r["p0"] == p0 and r.get("rounds")]
        n_rounds = min(len(r["rounds"]) for r in rs)
        for k in sorted({0, n_rounds - 1}):
            means = {}
            for field in ("loss_std", "eta_g_std", "rank_corr_j_loss", "rank_corr_j_g"):
                vals = [_term(r["rounds"][k], field) for r in rs]
                vals = [v for v in vals if v is not None]
                means[field] = f"{np.mean(vals):.3f}" if vals else "-"
            out.append(
                f"| {row} | {p0:g} | {k + 1} | {means['loss_std']} | {means['eta_g_std']} | "
                f"{means['rank_corr_j_loss']} | {means['rank_corr_j_g']} |"
            )
    return out if keys else []


def _term(round_log: dict, field: str):
    """A population term of a round: under `population_terms` (the round log's `extra`), or
    at the top level."""
    return round_log.get("population_terms", {}).get(field, round_log.get(field))


def row_name(row: str, runs: list[dict]) -> str:
    """The row's name; the mean-reading search says its eta (set per run by --mean-eta)."""
    etas = sorted({r.get("eta") for r in runs if r["row"] == row and r.get("eta") is not None})
    if row == "search_mean" and etas:
        return ROW_NAMES[row][:-1] + ", eta " + "/".join(f"{e:g}" for e in etas) + ")"
    return ROW_NAMES[row]


def layer_policies(runs: list[dict], p0: float) -> dict[str, list[float]]:
    """Per-layer sparsities at p0 of the first seed that has a searched row: uniform, OWL and
    each search."""
    rows = [r for r in runs if r["p0"] == p0 and r.get("layer_sparsities")]
    seeds = sorted({r["seed"] for r in rows if r["row"] in SEARCH_ROWS})
    if not seeds:
        return {}
    seed = seeds[0]
    out = {}
    for row in ("sparsegpt", "owl", *SEARCH_ROWS):
        for r in rows:
            if r["row"] == row and r["seed"] == seed:
                out[f"{row_name(row, runs)} (seed {seed})"] = r["layer_sparsities"]
    return out


def override_lines(runs: list[dict]) -> list[str]:
    """What the rows changed in the recipe (`real_model.py --set`), or nothing when none did:
    the table's figures hold for that recipe, not the shipped one. Rows that differ are named."""
    sets: dict[str, list[str]] = {}
    for r in runs:
        o = r.get("recipe_overrides") or {}
        text = ", ".join(f"{k}={v}" for k, v in sorted(o.items())) or "none"
        sets.setdefault(text, []).append(r["key"])
    if set(sets) <= {"none"}:
        return []
    if len(sets) == 1:
        return [f"Recipe settings changed for every row: {next(iter(sets))}."]
    return ["Recipe settings changed per row (rows differ, so compare with care):"] + [
        f"- {text}: {', '.join(sorted(keys))}" for text, keys in sorted(sets.items())
    ]


def write_outputs(run_dir: str | os.PathLike) -> list[str]:
    """table.md, layers.png and report.md in run_dir from its runs.jsonl; the paths written."""
    from ellava_jax.report import plots

    d = Path(run_dir)
    runs = read_runs(d)
    summary = summarize(runs)
    table = markdown_table(summary)
    written = []
    (d / "table.md").write_text("\n".join(table) + "\n")
    written.append(str(d / "table.md"))
    search_p0s = sorted({r["p0"] for r in runs if r["row"] in SEARCH_ROWS})
    panels = {p0: layer_policies(runs, p0) for p0 in search_p0s}
    panels = {p0: v for p0, v in panels.items() if v}
    fig = None
    if panels:
        fig = plots.method_layer_sparsities(panels, d / "layers.png")
        written.append(str(fig))
    machine = sorted({r.get("machine", "?") for r in runs})
    held = summary.get("heldout") or {}
    md = [
        "# Pruning methods on a real model: held-out perplexity",
        "",
        f"Held-out text: {held.get('source', '?')} ({', '.join(held.get('books', []))}), "
        f"{held.get('windows', '?')} windows x {held.get('seq_len', '?')} tokens. "
        "Mean +- sample std over seeds (the seed draws the calibration proxy).",
        f"Machine: {'; '.join(machine)}.",
        *override_lines(runs),
        "",
        *table,
        "",
        "## Targets",
        "",
        *(verdict(summary) or ["- no search row yet"]),
    ]
    pop = population_lines(runs)
    if pop:
        md += ["", "## The terms of J over the population (mean over seeds)", "", *pop]
    if fig:
        md += ["", "## Per-layer sparsity", "", "![per-layer sparsity](layers.png)"]
    (d / "report.md").write_text("\n".join(md) + "\n")
    written.append(str(d / "report.md"))
    return written

"""Every PNG figure of the project: a search's and a run report's.

Matplotlib with the Agg backend (no display). Each function takes the numbers to draw (read from
the files a run wrote, by `ellava_jax.search.run` or `ellava_jax.report.report`), writes one PNG
and returns its path; none reads a file or composes text. One function per figure kind:

  fitness_over_rounds     best and mean fitness J per round
  policy_bars             the per-layer sparsity of one policy against its p0 (a search's)
  policies_bars           the per-layer sparsity of several policies, one bar per p0 (the report's)
  accuracy_by_category    accuracy per category, one bar per model (a search's)
  accuracy_rows_bars      accuracy per category, one bar per row of the report's table
  tradeoff                accuracy vs speedup, uniform vs EfficientLLaVA, one panel per speedup
  method_layer_sparsities per-layer sparsity of uniform, OWL and searched policies per p0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path):
    """Lays out, writes and closes `fig`; returns `path` as given."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _grouped_bars(ax, n_groups: int, series: Sequence[tuple[Sequence[float], dict]]) -> list:
    """One bar per series in each of `n_groups` groups (0.8 wide together, centred on the group).

    series: (values, keyword arguments of `ax.bar`). A single series gives plain bars at 0..n-1.
    Returns the bar containers, in the order of `series`.
    """
    x = np.arange(n_groups)
    w = 0.8 / max(len(series), 1)
    return [ax.bar(x + k * w - 0.4 + w / 2, v, w, **kw) for k, (v, kw) in enumerate(series)]


def layer_means(policy: list) -> list:
    """One sparsity per decoder layer: per-matrix entries (lists) are averaged."""
    return [sum(x) / len(x) if isinstance(x, list) else x for x in policy]


def _category_values(result: dict, cats: Sequence[str], missing: float) -> list:
    """Accuracy per category (`missing` where the result has none), then overall."""
    return [result["per_category"].get(c, missing) for c in cats] + [result["accuracy"]]


# ---------------------------------------------------------------------------------------------
# a search's figures (beside its result.json)


def fitness_over_rounds(rounds: list[dict], path: str, title: str = "EfficientLLaVA search") -> str:
    """Best and mean fitness J per round (rows of rounds.jsonl). Staged selection: each stage's
    best J on its own slice of the proxy (the legend names the share), and the mean over the
    population on the first stage's slice (the one every candidate reads)."""
    r = [x["round"] + 1 for x in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    stages = rounds[0].get("extra", {}).get("stages") if rounds else None
    if stages:
        for i, s in enumerate(stages):
            best = [x["extra"]["stages"][i]["best"] for x in rounds]
            ax.plot(r, best, "o-", label=f"best J, stage {i + 1} ({s['share']:g} of the proxy)")
        ax.plot(r, [x["mean_fitness"] for x in rounds], "s--", label="mean J, stage 1")
    else:
        ax.plot(r, [x["best_fitness"] for x in rounds], "o-", label="best J")
        ax.plot(r, [x["mean_fitness"] for x in rounds], "s--", label="mean J")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("fitness J = L + eta G (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def policy_bars(policy: list, p0: float, path: str, title: str = "per-layer sparsity") -> str:
    """The found per-layer sparsities (per-matrix policies are averaged per layer) against p0."""
    vals = layer_means(policy)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(vals) + 2), 3.2), dpi=120)
    _grouped_bars(ax, len(vals), [(vals, dict(color="tab:blue", label="searched"))])
    ax.axhline(p0, color="tab:red", ls="--", label=f"uniform p0 = {p0:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, min(1.0, max(vals) + 0.15))
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def accuracy_by_category(
    results: dict[str, dict], path: str, title: str = "accuracy by category"
) -> str:
    """Grouped bars: one group per category, one bar per model (`evaluate_records` results)."""
    names = list(results)
    cats = sorted({c for r in results.values() for c in r["per_category"]})
    n = len(cats) + 1
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * n + 2), 3.5), dpi=120)
    _grouped_bars(ax, n, [(_category_values(results[k], cats, 0.0), dict(label=k)) for k in names])
    ax.set_xticks(np.arange(n), cats + ["overall"], rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# a run report's figures (`ellava report`)


def policies_bars(policies: Mapping[float, list], path) -> str:
    """The found per-layer sparsities, one bar group per layer and one bar per p0 (dashed: p0)."""
    ps = list(policies)
    pol = {p0: layer_means(policy) for p0, policy in policies.items()}
    n = max(len(v) for v in pol.values())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n * len(ps) + 2.5), 3.6), dpi=120)
    bars = _grouped_bars(ax, n, [(pol[p0], dict(label=f"searched, p0 = {p0:g}")) for p0 in ps])
    for p0, b in zip(ps, bars):
        ax.axhline(p0, color=b.patches[0].get_facecolor(), ls="--", lw=1)
    x = np.arange(n)
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (dashed: uniform p0)")
    ax.set_ylim(0, min(1.0, max(max(v) for v in pol.values()) + 0.2))
    ax.set_title("per-layer sparsity of the found policies")
    ax.legend(fontsize=8, loc="upper right", ncol=len(ps))
    return str(_save(fig, path))


def accuracy_rows_bars(cats: list[str], rows: list[tuple[str, dict]], path) -> str:
    """Grouped bars: one group per category (+ overall), one bar per row of the table
    (`evaluate_records` results; a category a row lacks has no bar)."""
    n = len(cats) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 4.5), 3.8), dpi=120)
    _grouped_bars(ax, n, [(_category_values(r, cats, np.nan), dict(label=k)) for k, r in rows])
    ax.set_xticks(np.arange(n), cats + ["overall"], rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_title("accuracy by category (test split)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return str(_save(fig, path))


# (role, p0) keys: ("dense", None), ("uniform", p0), ("searched", p0)
Points = Mapping[tuple[str, float | None], float]


def _tradeoff_axes(ax, p0s: Sequence[float], acc: Points, speed: Points, xlabel: str) -> None:
    for role, style, name in (
        ("uniform", "s--", "uniform SparseGPT"),
        ("searched", "o-", "EfficientLLaVA"),
    ):
        pts = sorted(
            (speed[(role, p0)], acc[(role, p0)], p0)
            for p0 in p0s
            if (role, p0) in speed and (role, p0) in acc
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            for x, y, p0 in pts:
                ax.annotate(
                    f"p0={p0:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    if ("dense", None) in acc:
        ax.plot(
            [speed.get(("dense", None), 1.0)], [acc[("dense", None)]], "k*", ms=10, label="dense"
        )
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("accuracy (test split)")
    ax.set_title("accuracy vs speed: uniform vs EfficientLLaVA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def tradeoff(p0s: Sequence[float], acc: Points, panels: Sequence[tuple[Points, str]], path) -> str:
    """The paper's Figure 1: accuracy vs speedup, uniform vs EfficientLLaVA, one point per p0.

    acc: accuracy per (role, p0); panels: (speedup per (role, p0), x-axis label), side by side.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), dpi=120)
    for ax, (speed, xlabel) in zip(np.atleast_1d(axes), panels):
        _tradeoff_axes(ax, p0s, acc, speed, xlabel)
    return str(_save(fig, path))


def method_layer_sparsities(panels: Mapping[float, Mapping[str, Sequence[float]]], path) -> str:
    """Per-layer sparsity of several methods (lines), one panel per p0 (the real-model table's
    uniform, OWL and searched policies)."""
    n_series = max(len(series) for series in panels.values())
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 3.2 + 0.22 * n_series), dpi=120, squeeze=False
    )
    for ax, (p0, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            ax.plot(np.arange(len(values)), values, marker=".", lw=1.2, label=name)
        ax.axhline(p0, color="grey", ls=":", lw=1)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("sparsity")
        ax.set_title(f"mean sparsity {p0:g}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    # below, off the data; one column under a single panel, whose width two long names overflow
    ncol = 2 if len(panels) > 1 else 1
    rows = -(-n_series // ncol)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=ncol)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, bbox_inches="tight")  # a name longer than the figure widens it, not cut
    plt.close(fig)
    return str(path)

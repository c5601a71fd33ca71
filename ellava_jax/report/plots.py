"""PNG plots of a search: fitness over rounds, the policy's per-layer sparsity, accuracy by category.

Matplotlib with the Agg backend (no display); every plot reads the files a run wrote.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def fitness_over_rounds(rounds: list[dict], path: str, title: str = "EfficientLLaVA search") -> str:
    """Best and mean fitness J per round (rows of rounds.jsonl)."""
    r = [x["round"] + 1 for x in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    ax.plot(r, [x["best_fitness"] for x in rounds], "o-", label="best J")
    ax.plot(r, [x["mean_fitness"] for x in rounds], "s--", label="mean J")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("fitness J = L + eta G (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def policy_bars(policy: list, p0: float, path: str, title: str = "per-layer sparsity") -> str:
    """The found per-layer sparsities (per-matrix policies are averaged per layer) against p0."""
    vals = [sum(x) / len(x) if isinstance(x, list) else x for x in policy]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(vals) + 2), 3.2), dpi=120)
    ax.bar(range(len(vals)), vals, color="tab:blue", label="searched")
    ax.axhline(p0, color="tab:red", ls="--", label=f"uniform p0 = {p0:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, min(1.0, max(vals) + 0.15))
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy_by_category(
    results: dict[str, dict], path: str, title: str = "accuracy by category"
) -> str:
    """Grouped bars: one group per category, one bar per model (`evaluate_records` results)."""
    import numpy as np

    names = list(results)
    cats = sorted({c for r in results.values() for c in r["per_category"]})
    x = np.arange(len(cats) + 1)
    w = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(x) + 2), 3.5), dpi=120)
    for i, n in enumerate(names):
        vals = [results[n]["per_category"].get(c, 0.0) for c in cats] + [results[n]["accuracy"]]
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=n)
    ax.set_xticks(x, cats + ["overall"], rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

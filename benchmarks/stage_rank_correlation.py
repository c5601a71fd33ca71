"""How well a slice of the proxy ranks candidates: why staged selection holds at some sparsities
and not at others.

Staged selection (issue 24) ranks a round's candidates by J on a slice of the proxy and lets
only the best read more. That works while J on the slice orders candidates as J on the whole
proxy does. This scores a set of candidates on each proxy row alone (per-row J, the fitness's
own KL), so J on any k-row slice is a token-weighted mean of rows, and prints, per group of
candidates and slice size, the Spearman rank correlation of slice J with whole-proxy J (mean
+- std over random slices) and where the slice's best candidate ranks on the whole proxy (its
rank quantile: 0 the best, 1 the worst).

Groups: "near": a policy the search found (the KL search's winner in a real_model.py
runs.jsonl at that seed and p0, else the uniform policy) and mutations of it (one to three
layers moved a level up and as many down: the budget holds), what a population looks like
after a few rounds; "random": random valid policies, what round 1 scores.

    PYTHONPATH=. .venv/bin/python benchmarks/stage_rank_correlation.py \\
        [--config configs/smollm2.yaml] [--seed 0] [--p0 0.7] \\
        [--runs benchmarks/results/staged_selection/runs.jsonl] [--out FILE.json]

About 5 minutes on 2 CPU cores for SmolLM2 (16 rows x 48 candidates, plus the database).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def slice_agreement(row_j, weights, k: int, draws: int, rng) -> dict:
    """Over `draws` random k-row slices: Spearman of slice J with whole J, and the whole-proxy
    rank quantile of the slice's best candidate."""
    from ellava_jax.search.evolve import _ranks, spearman

    whole = row_j @ weights / weights.sum()
    whole_rank = _ranks(whole)
    corr, best_at = [], []
    for _ in range(draws):
        rows = rng.choice(row_j.shape[1], k, replace=False)
        part = row_j[:, rows] @ weights[rows] / weights[rows].sum()
        corr.append(spearman(part, whole))
        best_at.append(whole_rank[np.argmin(part)] / (len(whole) - 1))
    return {
        "rows": k,
        "tokens": int(round(weights.mean() * k)),
        "spearman_mean": float(np.mean(corr)),
        "spearman_std": float(np.std(corr, ddof=1)),
        "best_rank_quantile": float(np.mean(best_at)),
    }


def reference_policy(space, runs: str | None, seed: int, p0: float):
    """The KL search's winner at (seed, p0) from a real_model.py runs.jsonl, as level indices;
    else the uniform policy."""
    if runs and os.path.exists(runs):
        for line in open(runs):
            r = json.loads(line)
            if r.get("row") == "search_kl" and r.get("seed") == seed and r.get("p0") == p0:
                idx = space.index_of(r["layer_sparsities"])
                if idx is not None:
                    return idx, "search_kl winner"
    return space.uniform(), "uniform policy"


def mutations(space, centre, n: int, rng) -> np.ndarray:
    """`n` policies one to three paired level moves (one layer up, another down) from `centre`."""
    out = []
    while len(out) < n:
        c = centre.copy()
        for _ in range(rng.integers(1, 4)):
            a, b = rng.choice(len(c), 2, replace=False)
            if c[a] < space.n_levels - 1 and c[b] > 0:
                c[a] += 1
                c[b] -= 1
        if space.is_valid(c[None]).all():
            out.append(c)
    return np.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p0", type=float, default=0.7)
    ap.add_argument("--runs", default="benchmarks/results/staged_selection/runs.jsonl")
    ap.add_argument("--mutations", type=int, default=24)
    ap.add_argument("--random", type=int, default=16)
    ap.add_argument("--draws", type=int, default=200, help="random slices per slice size")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from ellava_jax.app.models import load_model
    from ellava_jax.app.sources import search_proxy
    from ellava_jax.prune.database import build_database
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.search.fitness import fitness
    from ellava_jax.search.policy import PolicySpace
    from ellava_jax.search.proxy_batches import FitnessBatches, _take_rows
    from ellava_jax.search.settings import load_settings

    t0 = time.perf_counter()
    # the KL search's objective (eta 0: J is the KL alone, as the staged rows of real_model.py)
    s = load_settings(args.config, seed=args.seed, p0=args.p0).replace(eta=0.0, fitness_loss="kl")
    config, params, model_dir = load_model(s.model)
    proxy = search_proxy(s, config, model_dir)
    if len(proxy.mm_ids):
        raise SystemExit(f"{s.model}: this benchmark reads a text-only proxy (rows of text)")
    calib = build_calibration_set(config, params, proxy.calibration_batches(), s.calib_batch_size)
    space = PolicySpace(config, s.p0, s.granularity, s.step, s.width, s.tol)
    db = build_database(config, params, calib, space.levels, batch_size=s.calib_batch_size)
    fb = FitnessBatches(config, params, proxy, s)
    rng = np.random.default_rng(args.seed + 123)
    centre, centre_from = reference_policy(space, args.runs, args.seed, args.p0)
    near = np.concatenate([centre[None], mutations(space, centre, args.mutations, rng)])
    cands = np.concatenate([near, space.random(args.random, rng)])
    groups = {"near": np.arange(len(near)), "random": np.arange(len(near), len(cands))}
    print(
        f"{s.model} p0 {s.p0:g} seed {s.seed}: {len(near)} near ({centre_from} and "
        f"{args.mutations} mutations), {args.random} random; {fb.n_text} proxy rows",
        flush=True,
    )
    # each proxy row alone (from the fitness's own length groups), in proxy order
    rows = sorted(
        (int(proxy_row), b, i)
        for b, group_rows in zip(fb.text, fb._text_rows)
        for i, proxy_row in enumerate(group_rows)
    )
    row_j = np.zeros((len(cands), len(rows)))
    weights = np.zeros(len(rows))
    p = s.population
    padded = np.concatenate([cands, np.repeat(cands[:1], (-len(cands)) % p, 0)])
    for k, (_, b, i) in enumerate(rows):
        part = _take_rows(b, np.array([i]))
        weights[k] = float(np.asarray(part.label_mask).sum())
        j = [
            np.asarray(fitness(config, params, db, space, padded[c : c + p], [part], 0.0)[0])
            for c in range(0, len(padded), p)
        ]
        row_j[:, k] = np.concatenate(j)[: len(cands)]
        print(f"  row {k + 1}/{len(rows)} scored ({time.perf_counter() - t0:.0f} s)", flush=True)
    whole = row_j @ weights / weights.sum()
    out = {"model": s.model, "p0": s.p0, "seed": s.seed, "reference": centre_from, "groups": {}}
    sizes = [k for k in (1, 2, 4, 8) if k < len(rows)]
    for name, ix in groups.items():
        g = {
            "candidates": len(ix),
            "whole_j_min": float(whole[ix].min()),
            "whole_j_std": float(np.std(whole[ix], ddof=1)),
            "slices": [slice_agreement(row_j[ix], weights, k, args.draws, rng) for k in sizes],
        }
        out["groups"][name] = g
        print(f"{name}: {g['candidates']} candidates, whole-proxy J std {g['whole_j_std']:.4f}")
        for x in g["slices"]:
            print(
                f"  {x['rows']} rows ({x['tokens']} tokens): Spearman with the whole proxy "
                f"{x['spearman_mean']:.3f} +- {x['spearman_std']:.3f}; the slice's best ranks "
                f"at quantile {x['best_rank_quantile']:.2f} on the whole proxy"
            )
    out["seconds"] = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from ellava_jax.errors import run_script

    run_script(main)  # a bad recipe or --set: its one line, exit code 2

"""Does a lower proxy J mean a better model? The policies a real_model.py run found, scored on
the search's own proxy and on held-out text with the same level database.

A search ranks policies by J on its proxy (SmolLM2: 16 x 128 Old Testament tokens). If a
policy with a lower proxy J than another also has the lower J on held-out text, the search's
selection fidelity pays; if not, the search fits its proxy. This takes the winners of every
searched row of a runs.jsonl at one seed and p0 (and the uniform policy), scores each with the
fitness itself (KL against the dense model, eta 0, the database's one-shot levels) on

- the seed's proxy, as the search read it, and
- the first `--heldout-windows` of the held-out windows (Matthew and Mark, 256 tokens each),
  both as J and as the next-token loss (its exp: the database model's held-out perplexity),

and prints them beside the row's held-out perplexity (the sequentially re-pruned model, from
the runs.jsonl), with the Spearman correlations between them. The database model (each layer
pruned alone from the dense inputs, what J reads) and the re-pruned model (each layer pruned
on the inputs of the layers pruned before it, what a user gets) can rank policies apart.

    PYTHONPATH=. .venv/bin/python benchmarks/proxy_fit.py --runs DIR/runs.jsonl \\
        [--config configs/smollm2.yaml] [--set proxy_segments=64] [--seed 0] [--p0 0.7] \\
        [--heldout-windows 32] [--out FILE.json]

5-8 minutes on 2 CPU cores (AVX2) for SmolLM2 with 3-5 policies (the database, then a few
forward passes per policy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HELDOUT_SEQ_LEN = 256  # real_model.py's held-out windows
CHUNK = 8  # held-out windows (or proxy rows) scored at a time


def found_policies(space, runs: str, seed: int, p0: float) -> list[dict]:
    """The rows of `runs` at (seed, p0) whose per-layer sparsities are a valid policy of the
    grid (searched rows and uniform SparseGPT), as level indices, first of each policy kept."""
    out, seen = [], set()
    for line in open(runs):
        r = json.loads(line)
        if r.get("seed") != seed or r.get("p0") != p0 or "layer_sparsities" not in r:
            continue
        idx = space.index_of(r["layer_sparsities"])
        if idx is None or idx.tobytes() in seen:
            continue
        seen.add(idx.tobytes())
        out.append({"row": r["row"], "perplexity": r["perplexity"], "policy": idx})
    return out


def spearman(a, b) -> float:
    from ellava_jax.search.evolve import spearman as _spearman

    return float(_spearman(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--runs", required=True, help="a real_model.py runs.jsonl")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p0", type=float, default=0.7)
    ap.add_argument("--heldout-windows", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from ellava_jax.app.models import load_model
    from ellava_jax.app.sources import heldout_windows, search_proxy
    from ellava_jax.errors import UserError
    from ellava_jax.prune.database import build_database
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.search.fitness import fitness
    from ellava_jax.search.policy import PolicySpace
    from ellava_jax.search.proxy_batches import FitnessBatches
    from ellava_jax.search.proxy_sources import ProxyData, no_images
    from ellava_jax.search.settings import command_line_overrides, load_settings

    t0 = time.perf_counter()
    sets, origins = command_line_overrides(args.set)
    sets = sets | {"seed": args.seed, "p0": args.p0, "eta": 0.0, "fitness_loss": "kl"}
    s = load_settings(args.config, sets, origins=origins)
    if not os.path.exists(args.runs):
        raise UserError(f"{args.runs}: no such file (a real_model.py runs.jsonl)")
    config, params, model_dir = load_model(s.model)
    space = PolicySpace(config, s.p0, s.granularity, s.step, s.width, s.tol)
    found = found_policies(space, args.runs, s.seed, s.p0)
    if len(found) < 2:
        raise UserError(f"{args.runs}: fewer than two policies at seed {s.seed}, p0 {s.p0:g}")
    proxy = search_proxy(s, config, model_dir)
    if len(proxy.mm_ids):
        raise UserError(f"{s.model}: this benchmark reads a text-only proxy (rows of text)")
    calib = build_calibration_set(config, params, proxy.calibration_batches(), s.calib_batch_size)
    db = build_database(config, params, calib, space.levels, batch_size=s.calib_batch_size)
    ids, mask, _ = heldout_windows(config, model_dir, "bible", HELDOUT_SEQ_LEN)
    n = min(args.heldout_windows, len(ids))
    heldout = ProxyData(ids[:n], mask[:n], *no_images(config))
    print(
        f"{s.model} p0 {s.p0:g} seed {s.seed}: {len(found)} policies from {args.runs}; proxy "
        f"{proxy.text_ids.shape[0]} x {proxy.text_ids.shape[1]}, held-out {n} x "
        f"{HELDOUT_SEQ_LEN} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    policies = np.stack([f["policy"] for f in found])

    def j_of(data: ProxyData, settings) -> np.ndarray:
        """J of every policy on `data`, `CHUNK` rows at a time (the KL's log-probabilities of
        the whole 32 x 256 held-out set do not fit in 24 GiB), token-weighted as one batch."""
        total, tokens = np.zeros(len(policies)), 0.0
        for a in range(0, len(data.text_ids), CHUNK):
            rows = slice(a, a + CHUNK)
            part = ProxyData(data.text_ids[rows], data.text_mask[rows], *no_images(config))
            fb = FitnessBatches(config, params, part, settings)
            w = float(sum(np.asarray(b.label_mask).sum() for b in fb.text))
            total += w * np.asarray(fitness(config, params, db, space, policies, fb.text, 0.0)[0])
            tokens += w
        return total / tokens

    scores = {}
    lm = s.replace(fitness_loss="lm")  # J = the next-token loss: exp(J) is a perplexity
    for name, data, settings in (
        ("proxy_j", proxy, s),
        ("heldout_j", heldout, s),
        ("heldout_lm", heldout, lm),
    ):
        scores[name] = j_of(data, settings)
        print(f"  {name} scored ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for k, f in enumerate(found):
        rows.append(
            {
                "row": f["row"],
                "proxy_j": float(scores["proxy_j"][k]),
                "heldout_j": float(scores["heldout_j"][k]),
                "heldout_perplexity_db": float(np.exp(scores["heldout_lm"][k])),
                "perplexity": f["perplexity"],
                "policy": f["policy"].tolist(),
            }
        )
    print(
        "| row | proxy J | held-out J | held-out perplexity, database | held-out perplexity, "
        "re-pruned |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["proxy_j"]):
        print(
            f"| {r['row']} | {r['proxy_j']:.4f} | {r['heldout_j']:.4f} | "
            f"{r['heldout_perplexity_db']:.2f} | {r['perplexity']:.2f} |"
        )
    keys = ("proxy_j", "heldout_j", "heldout_perplexity_db", "perplexity")
    col = {k: np.array([r[k] for r in rows]) for k in keys}
    corr = {
        f"{a}_vs_{b}": spearman(col[a], col[b]) for i, a in enumerate(keys) for b in keys[i + 1 :]
    }
    print("Spearman: " + ", ".join(f"{k} {v:.2f}" for k, v in corr.items()))
    out = {
        "model": s.model,
        "p0": s.p0,
        "seed": s.seed,
        "runs": args.runs,
        "overrides": args.set,
        "proxy": list(proxy.text_ids.shape),
        "heldout": [n, HELDOUT_SEQ_LEN],
        "rows": rows,
        "spearman": corr,
        "seconds": time.perf_counter() - t0,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from ellava_jax.errors import run_script

    run_script(main)  # a bad recipe or --set: its one line, exit code 2

"""The search's quality table (the paper's Tables 1-2 shape) on the toy: seeds x p0 x ablations.

For each ablation, p0 and seed it runs `ellava search` in-process (`run_search`) and records the
toy test split accuracy of the dense model, uniform SparseGPT at p0 (the same seed's
calibration) and the searched model (for `owl`, which runs no search: OWL's layer sparsities
with SparseGPT on the same calibration). One JSON line per run goes to OUT/runs.jsonl as soon as the
run ends, so a killed benchmark keeps what it finished and a rerun skips it. At the end it prints
a markdown table, mean +- sample standard deviation over seeds, and writes OUT/table.md.

    PYTHONPATH=. .venv/bin/python benchmarks/search_quality.py --out runs/quality \\
        [--p0 0.5 0.7] [--seeds 0 1 2] [--ablations owl full auto_wo_gen no_evo evo_wo_ub] \\
        [--budget-s 3600]

On 2 CPU cores one toy search takes about 18 minutes, so the whole table (24 searches) is a
job for an accelerator or a long night.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROW_NAMES = {
    "uniform": "Uniform (SparseGPT, no search)",
    "owl": "OWL + SparseGPT (no search)",
    "full": "EfficientLLaVA (full: every candidate on the whole proxy, 20 projector steps on all samples)",
    "staged": "EfficientLLaVA, staged selection (16 on 1/32 of the proxy, 1 on 1/2), 4 projector steps on 8 samples at lr 5e-4",
    "staged_wide": "EfficientLLaVA, staged selection (16 on 1/8 of the proxy, 1 on 1/2), 4 projector steps on 8 samples at lr 5e-4",
    "auto_wo_gen": "Auto w/o Gen (eta = 0)",
    "no_evo": "No Evo (no projector training)",
    "evo_wo_ub": "Evo w/o UB (c_m = 1/M)",
}
ROWS = tuple(ROW_NAMES)  # the table's order
# rows beyond the paper's ablations: the settings each sets over the recipe ("full" pins the
# paper's selection and projector step whatever the recipe's defaults)
PAPER = {
    "selection": "full",
    "projector_samples": None,
    "projector_steps": 20,
    "projector_lr": 1e-4,
}
ROW_SETTINGS = {
    "full": PAPER,
    "auto_wo_gen": PAPER,
    "evo_wo_ub": PAPER,
    "no_evo": {"selection": "full"},
    "staged": {
        "selection": "staged",
        "stage_shares": [1 / 32, 1 / 2],
        "stage_survivors": [1],
        "projector_samples": 8,
        "projector_steps": 4,
        "projector_lr": 5e-4,
    },
}
# the same with a first stage four times larger (on the toy 8 text rows and 4 samples, not 2 and 1)
ROW_SETTINGS["staged_wide"] = ROW_SETTINGS["staged"] | {"stage_shares": [1 / 8, 1 / 2]}


def _fingerprint(params) -> str:
    """A content hash of the decoder's linear kernels (dense, uniform and searched differ)."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params["language_model"]["layers"]):
        h.update(np.asarray(leaf).tobytes())
    h.update(np.asarray(jax.tree_util.tree_leaves(params["multi_modal_projector"])[0]).tobytes())
    return h.hexdigest()


def cached_evaluator(evaluate):
    """`evaluate` memoised on the parameters' content: dense is evaluated once, and the uniform
    model of a (seed, p0) once for all ablations."""
    memo: dict[str, dict] = {}

    def fn(config, params):
        key = _fingerprint(params)
        if key not in memo:
            memo[key] = evaluate(config, params)
        return memo[key]

    return fn


def run_key(ablation: str, p0: float, seed: int) -> str:
    return f"{ablation}/p0={p0:g}/seed={seed}"


def load_done(path: str) -> dict[str, dict]:
    done = {}
    if os.path.exists(path):
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    return done


def table(done: dict[str, dict], p0s, seeds) -> str:
    """Markdown: accuracy (%) mean +- std over seeds per row and p0, with the seeds counted."""

    def acc(r, which):
        return 100.0 * r["accuracy"][which]["accuracy"]

    lines = [
        "| method | " + " | ".join(f"p0 = {p:g}" for p in p0s) + " |",
        "| --- | " + " | ".join("---" for _ in p0s) + " |",
    ]
    dense = [acc(r, "dense") for r in done.values()]
    for row in ("dense", *ROWS):
        cells = []
        for p0 in p0s:
            if row == "dense":
                vals = dense[:1]
            elif row == "uniform":  # the same model in every ablation of a (p0, seed)
                vals = []
                for s in seeds:
                    runs = [r for r in done.values() if r["p0"] == p0 and r["seed"] == s]
                    vals += [acc(runs[0], "uniform")] if runs else []
            else:
                vals = [
                    acc(done[k], "searched") for s in seeds if (k := run_key(row, p0, s)) in done
                ]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.2f} (n=1)")
            else:
                cells.append(f"{np.mean(vals):.2f} +- {np.std(vals, ddof=1):.2f} (n={len(vals)})")
        name = "Dense" if row == "dense" else ROW_NAMES[row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/toy.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--p0", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--ablations", nargs="+", default=["owl", "full", "auto_wo_gen", "no_evo", "evo_wo_ub"]
    )
    ap.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="start no new search after this many seconds"
    )
    args = ap.parse_args(argv)

    import jax

    from ellava_jax.app.models import resolve_model_dir
    from ellava_jax.app.search import run_search
    from ellava_jax.app.sources import default_evaluator
    from ellava_jax.search.settings import ABLATIONS, load_settings

    known = set(ABLATIONS) | set(ROW_SETTINGS)  # what a row can set over the recipe
    bad = sorted(set(args.ablations) - known)
    if bad:
        raise SystemExit(f"unknown ablation(s) {bad}: expected some of {sorted(known)}")
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "runs.jsonl")
    done = load_done(log_path)
    print(f"devices: {jax.devices()}; {len(done)} runs already in {log_path}", flush=True)
    t_start = time.perf_counter()
    evaluate = None
    work = os.environ.get("SEARCH_QUALITY_WORK") or tempfile.mkdtemp(prefix="search-quality-")
    for ablation in args.ablations:
        for p0 in args.p0:
            for seed in args.seeds:
                key = run_key(ablation, p0, seed)
                if key in done:
                    continue
                if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: {key} and later not run")
                    break
                overrides = {"p0": p0, "seed": seed}
                if args.rounds is not None:
                    overrides["rounds"] = args.rounds
                settings = load_settings(args.config, **overrides)
                settings = settings.replace(**ROW_SETTINGS.get(ablation, {}))
                settings = settings.replace(**ABLATIONS.get(ablation, {}))
                if evaluate is None:
                    evaluate = cached_evaluator(
                        default_evaluator(settings, resolve_model_dir(settings.model))
                    )
                t0 = time.perf_counter()
                res = run_search(
                    settings,
                    os.path.join(work, key.replace("/", "_")),
                    evaluate=evaluate,
                    progress=False,
                    say=lambda m: None,
                )
                rec = {
                    "key": key,
                    "ablation": ablation,
                    "p0": p0,
                    "seed": seed,
                    "policy": res["policy"],
                    "mean_sparsity": res["mean_sparsity"],
                    "accuracy": res["accuracy"],
                    "timings_s": res["timings_s"],
                    "cost_ratio_vs_uniform_prune": res["cost_ratio_vs_uniform_prune"],
                    "cost_ratio_excluding_compile": res["cost_ratio_excluding_compile"],
                    "wall_s": time.perf_counter() - t0,
                    "device": str(jax.devices()[0]),
                }
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[key] = rec
                a = res["accuracy"]
                print(
                    f"{key}: dense {a['dense']['accuracy']:.4f} uniform "
                    f"{a['uniform']['accuracy']:.4f} searched {a['searched']['accuracy']:.4f} "
                    f"policy {res['policy']} ({rec['wall_s']:.1f} s)",
                    flush=True,
                )
    md = table(done, args.p0, args.seeds)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    from ellava_jax.errors import run_script

    run_script(main)  # a bad recipe or --set: its one line, exit code 2

"""The table users trust: pruning methods on a real pretrained LLaMA (SmolLM2-135M-Instruct, the
4-bit GGUF that setup installs, dequantised), held-out perplexity at equal measured sparsity.

Rows: dense; uniform magnitude, Wanda and SparseGPT; OWL + SparseGPT (at every p0); the
EfficientLLaVA search (eta 0.5, G read as the paper's sum) and Auto w/o Gen with the KL loss
(eta 0: EvoPress's objective) at the search p0s; optionally the search with G read as a mean
over matrices (`--mean-eta`, issue 23's depth study). Every method of a seed calibrates on the
same proxy (the recipe's `proxy_text`, drawn by that seed: Old Testament segments); every row is
scored on the same held-out text (128 x 256 tokens of Matthew and Mark, New Testament). The
recipe's `tol` (0.001 in configs/smollm2.yaml) keeps every searched policy at exactly p0, so all
rows compare at the same measured sparsity, which each row records.

One JSON line per row goes to OUT/runs.jsonl as soon as it is measured, so a killed benchmark
keeps what it finished and a rerun skips it (rows run seed-major: a partial run has whole seeds).
At the end OUT/table.md, OUT/layers.png and OUT/report.md are written (`ellava report OUT`
writes them again from runs.jsonl).

    PYTHONPATH=. .venv/bin/python benchmarks/real_model.py --out runs/real_model \\
        [--config configs/smollm2.yaml] [--seeds 0 1 2] [--p0 0.5 0.6 0.7] \\
        [--search-p0 0.6 0.7] [--rows ...] [--mean-eta 20] [--budget-s 7200] \\
        [--set proxy_segments=64 ...]

On 2 CPU cores (AVX-512): a baseline row about 1 minute with its evaluation, a search row
about 9 minutes (8 rounds of 16 candidates on 16 x 128 proxy tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASELINES = ("magnitude", "wanda", "sparsegpt", "owl")
# the KL search (search_kl) with staged selection (issue 24's curve, from cheap to generous,
# and one that spends what staging saves on 4x the candidates and 2x the rounds)
STAGED = {
    "kl_staged_cheap": dict(stage_shares=[1 / 32, 1 / 2], stage_survivors=[1]),  # the default
    "kl_staged_mid": dict(stage_shares=[1 / 8, 1 / 2, 1.0], stage_survivors=[4, 1]),
    "kl_staged_generous": dict(stage_shares=[1 / 4, 1.0], stage_survivors=[4]),
    "kl_staged_spend": dict(
        stage_shares=[1 / 16, 1 / 2], stage_survivors=[8], population=64, rounds=16
    ),
}
SEARCHES = ("search", "search_kl", "search_mean", *STAGED)
HELDOUT_SEQ_LEN = 256


def cpu_name() -> str:
    """The CPU model and whether it has AVX-512 (CPU timings depend on it)."""
    name, flags = platform.processor() or "cpu", ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name in ("cpu", ""):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return f"{name} ({'AVX-512' if 'avx512f' in flags else 'AVX2'}, {os.cpu_count()} cores)"


def run_key(row: str, p0: float, seed: int) -> str:
    return f"{row}/p0={p0:g}/seed={seed}"


def _fingerprint(params) -> str:
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params["language_model"]["layers"]):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


class Bench:
    """The model, the held-out windows, and a memoised perplexity (dense once; the uniform
    SparseGPT model a search prunes again is the baseline row's, scored once)."""

    def __init__(self, settings):
        from ellava_jax.app.models import load_model
        from ellava_jax.app.sources import heldout_windows

        self.config, self.params, self.model_dir = load_model(settings.model)
        if not self.config.is_text_only:
            raise SystemExit(f"{settings.model}: this benchmark takes a text-only LLaMA")
        self.ids, self.mask, self.heldout = heldout_windows(
            self.config, self.model_dir, "bible", HELDOUT_SEQ_LEN
        )
        self._memo: dict[str, float] = {}

    def perplexity(self, params) -> float:
        from ellava_jax.eval.harness import perplexity

        key = _fingerprint(params)
        if key not in self._memo:
            self._memo[key] = perplexity(self.config, params, self.ids, self.mask)
        return self._memo[key]

    def evaluator(self):
        def evaluate(config, params):
            return {"perplexity": self.perplexity(params)}

        return evaluate

    def calibration(self, settings):
        """The seed's proxy (as the search draws it) and the dense calibration set."""
        from ellava_jax.app.sources import search_proxy
        from ellava_jax.prune.hessian import build_calibration_set

        proxy = search_proxy(settings, self.config, self.model_dir)
        return build_calibration_set(
            self.config, self.params, proxy.calibration_batches(), settings.calib_batch_size
        )


def layer_means(config, sparsities) -> list[float]:
    """Per-layer parameter-weighted sparsity of {(layer, matrix): s}."""
    from ellava_jax.prune.masks import MATRICES, matrix_size

    w = {m: matrix_size(config, m) for m in MATRICES}
    return [
        float(sum(sparsities[(i, m)] * w[m] for m in MATRICES) / sum(w.values()))
        for i in range(config.text.num_hidden_layers)
    ]


def baseline_row(bench: Bench, row: str, p0: float, calib, owl_ratios, settings) -> dict:
    from ellava_jax.prune.masks import policy_to_sparsities, sparsity_summary
    from ellava_jax.prune.owl import owl_from_ratios
    from ellava_jax.prune.pipeline import prune_model

    cfg, n = bench.config, bench.config.text.num_hidden_layers
    t0 = time.perf_counter()
    layers = owl_from_ratios(owl_ratios, p0, settings.owl_lambda) if row == "owl" else [p0] * n
    method = "sparsegpt" if row == "owl" else row
    sparsities = policy_to_sparsities(cfg, layers)
    pruned, _ = prune_model(
        cfg,
        bench.params,
        sparsities,
        method,
        None if method == "magnitude" else calib,
        batch_size=settings.calib_batch_size,
        progress=False,
    )
    wall = time.perf_counter() - t0
    return {
        "perplexity": bench.perplexity(pruned),
        "measured_sparsity": sparsity_summary(cfg, pruned)["overall"],
        "layer_sparsities": layer_means(cfg, sparsities),
        "wall_s": wall,
    }


def flop_ratio(bench: Bench, settings) -> float:
    """The search's FLOPs over one uniform SparseGPT prune's (benchmarks/search_cost_model.py)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "search_cost_model.py")
    spec = importlib.util.spec_from_file_location("search_cost_model", path)
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    text, mm = cm.proxy_shapes(settings, bench.config, bench.model_dir)
    phases = cm.cost_model(settings, bench.config, text, mm, trained=0)
    uniform = phases.pop("uniform prune")
    return sum(phases.values()) / uniform


def search_row(bench: Bench, settings, work: str) -> dict:
    from ellava_jax.app.search import run_search

    res = run_search(settings, work, evaluate=bench.evaluator(), progress=False, say=lambda m: None)
    t = res["timings_s"]
    rounds = [json.loads(line) for line in open(os.path.join(work, "rounds.jsonl"))]
    return {
        "perplexity": res["accuracy"]["searched"]["perplexity"],
        "uniform_perplexity": res["accuracy"]["uniform"]["perplexity"],
        "measured_sparsity": res["measured_sparsity"],
        "layer_sparsities": [float(x) for x in res["policy"]],
        "best_fitness": res["best_fitness"],
        "wall_s": sum(t.get(f"{p}_s", 0.0) for p in ("database", "search", "final_prune")),
        "flop_ratio": flop_ratio(bench, settings),
        "selection": settings.selection,
        "stages": [list(x) for x in settings.stages()],
        "timings_s": t,
        "rounds": [
            {
                "round": r["round"],
                "best_fitness": r["best_fitness"],
                "mean_fitness": r["mean_fitness"],
                "best_loss": r["best_loss"],
                "best_g": r["best_g"],
                "seconds": r["seconds"],
                **r.get("extra", {}),
            }
            for r in rounds
        ],
    }


def search_settings(base, row: str, mean_eta: float | None):
    if row == "search":
        return base.replace(eta=0.5, fitness_loss="lm", g_reading="sum")
    if row == "search_kl":
        return base.replace(eta=0.0, fitness_loss="kl", g_reading="sum")
    if row in STAGED:
        kl = search_settings(base, "search_kl", mean_eta)
        return kl.replace(selection="staged", **STAGED[row])
    if mean_eta is None:
        raise SystemExit("row search_mean needs --mean-eta")
    return base.replace(eta=mean_eta, fitness_loss="lm", g_reading="mean")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--p0", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--search-p0", type=float, nargs="+", default=[0.6, 0.7])
    ap.add_argument("--rows", nargs="+", default=[*BASELINES, "search", "search_kl"])
    ap.add_argument("--mean-eta", type=float, default=None, help="eta of the search_mean row")
    ap.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    ap.add_argument("--budget-s", type=float, default=None, help="start no row after this")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting for every row, as `ellava search --set` (e.g. "
        "proxy_segments=64); each row records them (use another --out: keys do not name them)",
    )
    args = ap.parse_args(argv)

    import jax

    from ellava_jax.prune.owl import owl_outlier_ratios
    from ellava_jax.report.method_table import RUNS_FILE, read_runs
    from ellava_jax.search.settings import command_line_overrides, load_settings

    sets, origins = command_line_overrides(args.set)
    bad = sorted(set(args.rows) - set(BASELINES) - set(SEARCHES))
    if bad:
        raise SystemExit(f"unknown row(s) {bad}: expected some of {[*BASELINES, *SEARCHES]}")
    load_settings(args.config, sets, origins=origins)  # a bad recipe or --set: before any output
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, RUNS_FILE)
    done = {r["key"]: r for r in read_runs(args.out)} if os.path.exists(log_path) else {}
    machine = cpu_name()
    print(f"{machine}; devices {jax.devices()}; {len(done)} rows already in {log_path}", flush=True)
    work = os.environ.get("REAL_MODEL_WORK") or tempfile.mkdtemp(prefix="real-model-")
    t_start = time.perf_counter()
    bench = None

    def record(key, row, p0, seed, fields):
        rec = {"key": key, "row": row, "p0": p0, "seed": seed, **fields, "machine": machine}
        if sets:
            rec["recipe_overrides"] = sets
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key] = rec
        print(
            f"{key}: perplexity {rec['perplexity']:.3f} at measured sparsity "
            f"{rec['measured_sparsity']:.4f} ({rec['wall_s']:.1f} s)",
            flush=True,
        )

    for seed in args.seeds:
        overrides = sets | {"seed": seed} | ({"rounds": args.rounds} if args.rounds else {})
        base = load_settings(args.config, overrides, origins=origins)
        calib = ratios = None
        todo = [(r, p) for p in args.p0 for r in args.rows if r in BASELINES]
        todo += [(r, p) for p in args.search_p0 for r in args.rows if r in SEARCHES]
        for row, p0 in todo:
            key = run_key(row, p0, seed)
            if key in done or (row == "magnitude" and seed != args.seeds[0]):
                continue  # magnitude pruning reads no data: one seed says it all
            if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: {key} and later not run")
                break
            settings = base.replace(p0=p0)
            if bench is None:
                bench = Bench(base)
            if "dense" not in done:  # the dequantised 4-bit model
                dense = {"perplexity": bench.perplexity(bench.params), "heldout": bench.heldout}
                record("dense", "dense", 0.0, -1, dense | {"measured_sparsity": 0.0, "wall_s": 0.0})
            if row in BASELINES:
                if calib is None:
                    calib = bench.calibration(settings)
                    ratios = owl_outlier_ratios(
                        bench.config,
                        bench.params,
                        calib,
                        settings.owl_m,
                        batch_size=settings.calib_batch_size,
                        progress=False,
                    )
                record(key, row, p0, seed, baseline_row(bench, row, p0, calib, ratios, settings))
            else:
                s = search_settings(settings, row, args.mean_eta)
                fields = search_row(bench, s, os.path.join(work, key.replace("/", "_")))
                record(key, row, p0, seed, fields | {"eta": s.eta, "g_reading": s.g_reading})
        else:
            continue
        break
    from ellava_jax.report.method_table import write_outputs

    for path in write_outputs(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from ellava_jax.errors import run_script

    run_script(main)  # a bad recipe or --set: its one line, exit code 2

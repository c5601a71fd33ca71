"""Fitness throughput: the vmapped population call against a Python loop over the same candidates.

    .venv/bin/python benchmarks/bench_fitness.py [--model toy] [--population 16] [--repeats 3]

Prints the median seconds per population and candidates/s for both, their ratio (target >= 2x
at 16 candidates on the toy), and the largest difference between the two losses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--multimodal", type=int, default=32)
    args = ap.parse_args(argv)

    from ellava_jax.app.models import load_model
    from ellava_jax.app.search import FitnessBatches
    from ellava_jax.app.sources import search_proxy
    from ellava_jax.prune.database import build_database
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.search.fitness import loop_losses, population_losses
    from ellava_jax.search.policy import PolicySpace
    from ellava_jax.search.settings import SearchSettings

    s = SearchSettings(
        model=args.model,
        proxy_segments=args.segments,
        proxy_seq_len=args.seq_len,
        proxy_multimodal_samples=args.multimodal,
        fitness_loss="lm",
    )
    config, params, model_dir = load_model(args.model)
    space = PolicySpace(config, 0.5)
    proxy = search_proxy(s, config, model_dir)
    calib = build_calibration_set(config, params, proxy.calibration_batches())
    db = build_database(config, params, calib, space.levels, progress=False)
    parts = FitnessBatches(config, params, proxy, s).parts(params["multi_modal_projector"])
    idx = space.random(args.population, np.random.default_rng(0))

    def timed(fn):
        out = fn()  # warm-up: compilation excluded
        jax.block_until_ready(out)
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), np.asarray(out)

    t_vmap, l_vmap = timed(lambda: population_losses(config, params, db, space, idx, parts))
    t_loop, l_loop = timed(lambda: loop_losses(config, params, db, space, idx, parts))
    n_tok = sum(int(np.asarray(b.attention_mask).sum()) for b in parts)
    n_pos = sum(int(np.prod(b.attention_mask.shape)) for b in parts)
    shapes = ", ".join(f"{b.inputs_embeds.shape[0]}x{b.inputs_embeds.shape[1]}" for b in parts)
    print(
        f"model {args.model}: {config.text.num_hidden_layers} layers, proxy parts {shapes} "
        f"({n_pos} positions, {n_tok} real tokens), population {args.population}"
    )
    print(f"{'':>14} {'s/population':>13} {'candidates/s':>13}")
    print(f"{'vmapped':>14} {t_vmap:13.3f} {args.population / t_vmap:13.2f}")
    print(f"{'python loop':>14} {t_loop:13.3f} {args.population / t_loop:13.2f}")
    print(f"throughput ratio (vmapped / loop): {t_loop / t_vmap:.2f}x")
    print(f"max |loss difference|: {np.abs(l_vmap - l_loop).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

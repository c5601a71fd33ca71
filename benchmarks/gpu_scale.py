"""The search's phases at 7B width on one accelerator: time and measured peak beside `ellava plan`.

Builds a random LLaVA of LLaVA-1.5-7B's width (`--preset`) with `--layers` decoder layers in
bf16 on the device and runs, one process per phase (a device's peak counter only grows within a
process), the level database's build (calibration + SparseGPT at every level), one fitness
round of the population, and one projector step, at the paper's proxy sizes. Each phase prints
its time and `device.memory_stats()["peak_bytes_in_use"]`; the parent prints them beside the
plan's figure for the same shapes compiled on that device (`ellava_jax.plan`), then times
`benchmarks/bench_fitness.py --model toy` (vmapped population against a loop).

    python benchmarks/gpu_scale.py [--layers 8] [--preset llava-1.5-7b] [--json OUT.json]
    python benchmarks/gpu_scale.py --smoke          # tiny shapes: checks the script on a CPU

Fitness and projector phases fill the database with random pruned kernels (no OBS: their
process's peak is theirs alone). Target: plan within 15% of the measured peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PHASES = ("database", "fitness", "projector")


def build(args):
    """(config, params, settings, proxy) for the run's shapes, params on the device."""
    import jax

    from ellava_jax.config import get_preset
    from ellava_jax.model import init_params
    from ellava_jax.search.proxy_sources import random_proxy
    from ellava_jax.search.settings import SearchSettings

    base = get_preset("tiny" if args.smoke else args.preset)
    config = dataclasses.replace(
        base, text=dataclasses.replace(base.text, num_hidden_layers=args.layers)
    )
    params = init_params(config, jax.random.key(0), args.dtype)
    settings = SearchSettings(
        model="tiny",
        population=args.population,
        top_k=args.top_k,
        proxy_segments=args.rows,
        proxy_seq_len=args.seq,
        proxy_multimodal_samples=args.mm_rows,
        projector_steps=1,
        streaming=args.streaming,
        row_chunk=args.row_chunk,
        candidate_chunk=args.candidate_chunk,
        projector_offload=args.offload,
    )
    proxy = random_proxy(config, args.rows, args.seq, args.mm_rows)
    return config, params, settings, proxy


def random_database(config, params, levels):
    """A LevelDatabase of random masks of the dense kernels (stands in for OBS's output)."""
    import jax.numpy as jnp

    from ellava_jax.prune.database import LevelDatabase
    from ellava_jax.prune.masks import MATRICES, get_path, kernel_path

    rng = np.random.default_rng(0)
    stacks, norms = {}, {}
    for m in MATRICES:
        dense = get_path(params["language_model"]["layers"], kernel_path(0, m)[3:])  # [L, in, out]
        keep = [jnp.asarray(rng.random(dense.shape[1:]) >= s, dense.dtype) for s in levels]
        stacks[m] = jnp.stack([dense * k for k in keep], axis=1)  # [L, K, in, out]
        for layer in range(dense.shape[0]):
            norms[(layer, m)] = np.log(np.maximum(1.0 - np.asarray(levels), 1e-6)) / 2
    return LevelDatabase(np.asarray(levels), stacks, norms)


def run_phase(args) -> dict:
    import jax

    from ellava_jax.prune.database import build_database
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.search.fitness import fitness
    from ellava_jax.search.policy import PolicySpace
    from ellava_jax.search.projector import train_projector
    from ellava_jax.search.proxy_batches import FitnessBatches

    config, params, settings, proxy = build(args)
    space = PolicySpace(config, 0.5)
    t0 = time.perf_counter()
    if args.phase == "database":
        calib = build_calibration_set(config, params, proxy.calibration_batches(), 8)
        db = build_database(config, params, calib, space.levels, progress=False)
        jax.block_until_ready(list(db.stacks.values()))
    else:
        db = random_database(config, params, space.levels)
        fb = FitnessBatches(config, params, proxy, settings)
        idx = space.random(settings.population, np.random.default_rng(0))
        t0 = time.perf_counter()
        if args.phase == "fitness":
            out = fitness(
                config,
                params,
                db,
                space,
                idx,
                fb.parts(params["multi_modal_projector"]),
                0.5,
                streaming=settings.streaming,
                row_chunk=settings.row_chunk,
                candidate_chunk=settings.candidate_chunk,
            )
            jax.block_until_ready(out)
        else:
            w = np.full(settings.top_k, 1.0 / settings.top_k)
            proj, _ = train_projector(
                config,
                params,
                db,
                space,
                idx[: settings.top_k],
                w,
                fb.training,
                steps=1,
                lr=1e-4,
                streaming=settings.streaming,
                row_chunk=settings.row_chunk,
                candidate_chunk=settings.candidate_chunk,
                offload=settings.projector_offload,
            )
            jax.block_until_ready(proj)
    seconds = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    return {"phase": args.phase, "seconds": seconds, "peak_bytes": stats.get("peak_bytes_in_use")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("all", *PHASES), default="all")
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64, help="proxy text segments (paper: 64)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per segment (paper: 256)")
    ap.add_argument("--mm-rows", type=int, default=32, help="multimodal samples")
    ap.add_argument("--row-chunk", type=int, default=8)
    ap.add_argument("--candidate-chunk", type=int, default=4)
    ap.add_argument("--streaming", action="store_true")
    ap.add_argument("--offload", action="store_true", help="projector layer inputs on the host")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.seq, args.mm_rows, args.population, args.top_k = 4, 16, 2, 4, 2
        args.row_chunk, args.candidate_chunk, args.layers, args.dtype = 2, 3, 2, "float32"
    if args.phase != "all":
        print(json.dumps(run_phase(args)), flush=True)
        return 0

    import jax

    from ellava_jax.plan import GB, plan

    config, _, settings, _ = build(args)
    dev = jax.devices()[0]
    preset = "tiny" if args.smoke else args.preset
    print(f"# {dev.device_kind}; {args.layers} layers of {preset}, {args.dtype}", flush=True)
    planned = plan(settings, config, dtype=args.dtype)
    want = {"database": "database", "fitness": "fitness", "projector": "projector"}
    rows = []
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--phase"]
    for phase in PHASES:
        cmd = [sys.executable, os.path.abspath(__file__), *flags, "--phase", phase]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(f"{phase}: failed\n{out.stderr[-2000:]}", flush=True)
            rows.append({"phase": phase, "error": out.stderr[-2000:]})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["plan_bytes"] = planned["steps"].get(want[phase])
        if r["peak_bytes"] and r["plan_bytes"]:
            r["plan_over_measured"] = r["plan_bytes"] / r["peak_bytes"]
        rows.append(r)
        peak = "n/a" if not r["peak_bytes"] else f"{r['peak_bytes'] / GB:.1f} GB"
        ratio = r.get("plan_over_measured")
        print(
            f"{phase}: {r['seconds']:.1f} s, measured peak {peak}, plan "
            f"{(r['plan_bytes'] or 0) / GB:.1f} GB"
            + ("" if ratio is None else f" (plan / measured {ratio:.2f})"),
            flush=True,
        )
    bench = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_fitness.py"), "--model", "toy"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    print("# bench_fitness --model toy:\n" + (bench.stdout or bench.stderr)[-1500:], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "phases": rows, "plan": planned}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

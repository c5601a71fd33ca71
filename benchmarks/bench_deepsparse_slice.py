"""LLaMA-7B-width decoder slice: DeepSparse dense vs 50% / 70% unstructured sparse, and
onnxruntime dense, in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_deepsparse_slice.py [--layers 2] [--seq 256]

The slice: ``--layers`` decoder layers of LLaMA-7B width (hidden 4096, intermediate 11008,
32 heads), random weights, no embeddings and no lm_head (the graphs output the final-norm hidden
state), so the timing is the decoder's linear layers plus attention. Every linear kernel is
pruned at 50% and 70%: with our SparseGPT (``ellava_jax.prune.obs.sparsegpt``, random calibration
inputs) when ``--pruner sparsegpt`` and that module exists, else by magnitude (per matrix).
Two graphs per model: prefill of ``--seq`` tokens, one decode step at a ``--seq``-token context.

The ceiling, in the same run (``--no-ceiling`` skips it): the bare LLaMA-7B MLP matmuls
(``x @ W1 [4096, 11008] @ W2 [11008, 4096]``, no activation, pruned the same way) timed in
DeepSparse at one token and at ``--seq`` tokens, dense against each sparsity. How much a sparse
kernel gains depends on the CPU (AVX2 or AVX-512, cores, memory bandwidth), so the slice's
speedup is reported beside this machine's own ceiling and as a share of it.

Before timing, the runner checks every model's DeepSparse outputs against onnxruntime and
refuses to report on a mismatch. Figures: medians over all timed runs, speedup of each sparse
model over DeepSparse dense, and the 1 / (1 - s) limit. Needs ``.venv-deepsparse``
(scripts/setup_deepsparse.sh), ~10 GB of free disk in ``--workdir`` and ~8 GB of memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from convert import deepsparse as ds
from convert import onnx as conv

TARGETS = {("decode", 0.5): 1.7, ("decode", 0.7): 2.5, ("prefill", 0.5): 1.25}


@dataclass(frozen=True)
class SliceConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 2
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False


LINEARS = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
]


def _stack(trees: list[dict]) -> dict:
    """Per-layer trees -> one tree of [L, ...] leaves (the project's in-memory layout)."""
    return {
        k: _stack([t[k] for t in trees]) if isinstance(v, dict) else np.stack([t[k] for t in trees])
        for k, v in trees[0].items()
    }


def random_params(cfg: SliceConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    H, F = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "q_proj": (H, H),
        "k_proj": (H, H),
        "v_proj": (H, H),
        "o_proj": (H, H),
        "gate_proj": (H, F),
        "up_proj": (H, F),
        "down_proj": (F, H),
    }
    layers = []
    for _ in range(cfg.num_hidden_layers):
        layer = {"self_attn": {}, "mlp": {}}
        for mod, name in LINEARS:
            fan_in = shapes[name][0]
            w = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(
                1 / np.sqrt(fan_in)
            )
            layer[mod][name] = {"kernel": w}
        layer["input_layernorm"] = {"scale": np.ones(H, np.float32)}
        layer["post_attention_layernorm"] = {"scale": np.ones(H, np.float32)}
        layers.append(layer)
    stacked = _stack(layers)
    return {"language_model": {"layers": stacked, "norm": {"scale": np.ones(H, np.float32)}}}


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    k = int(round(sparsity * w.size))
    if k == 0:
        return w.copy()
    flat = np.abs(w).ravel()
    thresh = np.partition(flat, k - 1)[k - 1]
    out = w.copy()
    out[np.abs(w) <= thresh] = 0.0
    return out


def make_pruner(kind: str, seed: int = 0):
    """(name, fn(kernel [in, out], sparsity) -> pruned kernel)."""
    if kind == "sparsegpt":
        try:
            from ellava_jax.prune.obs import sparsegpt
        except ImportError as e:
            print(f"# SparseGPT unavailable ({e}); using magnitude pruning", file=sys.stderr)
        else:
            rng = np.random.default_rng(seed)

            def prune(w, s):
                x = rng.standard_normal((512, w.shape[0]), dtype=np.float32)
                h = (2.0 / x.shape[0]) * (x.T @ x)
                out = sparsegpt(w, h, s)
                pruned = out[0] if isinstance(out, tuple) else out
                return np.asarray(pruned, dtype=np.float32)

            return "sparsegpt (random calibration)", prune
    return "magnitude (per matrix)", magnitude_prune


def pruned_params(params: dict, sparsity: float, prune) -> dict:
    stack = params["language_model"]["layers"]
    new = {k: v for k, v in stack.items() if k not in ("self_attn", "mlp")}
    new["self_attn"], new["mlp"] = {}, {}
    for mod, name in LINEARS:
        new[mod][name] = {
            "kernel": np.stack([prune(w, sparsity) for w in stack[mod][name]["kernel"]])
        }
    return {"language_model": {"layers": new, "norm": params["language_model"]["norm"]}}


def export_bare_mlp(w1: np.ndarray, w2: np.ndarray, tokens: int, path: str) -> None:
    """``y = x @ w1 @ w2`` for ``x [1, tokens, in]``: the bare matmuls of the ceiling."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, w1.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, w2.shape[1]])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ],
        "bare_mlp",
        [x],
        [y],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", conv.DEFAULT_OPSET)])
    model.ir_version = conv.IR_VERSION
    onnx.save(model, path)


def measure_ceiling(cfg: SliceConfig, args, prune, wd: str) -> dict:
    """DeepSparse speedup of the bare MLP matmuls, {graph: {sparsity name: paired speedup}}."""
    rng = np.random.default_rng(1)
    H, F = cfg.hidden_size, cfg.intermediate_size
    w1 = rng.standard_normal((H, F), dtype=np.float32) * np.float32(1 / np.sqrt(H))
    w2 = rng.standard_normal((F, H), dtype=np.float32) * np.float32(1 / np.sqrt(F))
    weights = {"dense": (w1, w2)}
    for s in args.sparsities:
        weights[f"sparse{round(s * 100)}"] = (prune(w1, s), prune(w2, s))
    out = {}
    for g in args.graphs:
        tokens = 1 if g == "decode" else args.seq
        paths = {}
        for name, (a, b) in weights.items():
            paths[name] = os.path.join(wd, f"ceiling_{g}_{name}.onnx")
            export_bare_mlp(a, b, tokens, paths[name])
        feeds = {"x": rng.standard_normal((1, tokens, H), dtype=np.float32)}
        res = ds.benchmark_models(
            paths,
            feeds,
            engines=["deepsparse"],
            warmup=2,
            runs=args.decode_runs if g == "decode" else args.prefill_runs,
            rounds=args.decode_rounds if g == "decode" else args.prefill_rounds,
            num_cores=args.num_cores,
            workdir=os.path.join(wd, f"run_ceiling_{g}"),
        )
        base = res["models"]["dense"]["engines"]["deepsparse"]
        out[g] = {
            name: ds.paired_speedup(base, m["engines"]["deepsparse"])
            for name, m in res["models"].items()
            if name != "dense"
        }
        print(
            f"# ceiling {g} ({tokens} tokens), paired: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in out[g].items())
        )
    return out


def measured_sparsity(params: dict) -> float:
    z = n = 0
    stack = params["language_model"]["layers"]
    for mod, name in LINEARS:
        for w in stack[mod][name]["kernel"]:
            z += int(np.count_nonzero(w == 0))
            n += w.size
    return z / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="prefill length and decode context")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--pruner", choices=["sparsegpt", "magnitude"], default="sparsegpt")
    ap.add_argument("--num-cores", type=int, default=None, help="default: all physical cores")
    ap.add_argument("--prefill-runs", type=int, default=1, help="timed runs per model per round")
    ap.add_argument("--decode-runs", type=int, default=3, help="timed runs per model per round")
    ap.add_argument("--prefill-rounds", type=int, default=5)
    ap.add_argument("--decode-rounds", type=int, default=10)
    ap.add_argument(
        "--graphs", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"]
    )
    ap.add_argument(
        "--workdir", default=None, help="where the ONNX files go (default: a temp dir, removed)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse graphs a previous --keep run left in --workdir"
    )
    ap.add_argument(
        "--no-ceiling", action="store_true", help="skip the bare-MLP ceiling of this machine"
    )
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args(argv)

    if not ds.available():
        print(
            f"{ds.deepsparse_python()} not found: run scripts/setup_deepsparse.sh", file=sys.stderr
        )
        return 2
    cfg = SliceConfig(num_hidden_layers=args.layers)
    wd = args.workdir or tempfile.mkdtemp(prefix="ellava-slice-")
    os.makedirs(wd, exist_ok=True)
    t0 = time.time()
    pruner_name, prune = make_pruner(args.pruner)
    print(
        f"# slice: {args.layers} layers, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"{cfg.num_attention_heads} heads; pruner: {pruner_name}; seq {args.seq}; workdir {wd}"
    )

    meta_path = os.path.join(wd, "slice_meta.json")
    names = ["dense"] + [f"sparse{round(s * 100)}" for s in args.sparsities]
    paths: dict[str, dict[str, str]] = {
        g: {n: os.path.join(wd, f"{g}_{n}.onnx") for n in names} for g in args.graphs
    }
    meta = json.load(open(meta_path)) if args.reuse and os.path.exists(meta_path) else None
    if (
        meta
        and meta.get("key") == [args.layers, pruner_name]
        and all(os.path.exists(p) for v in paths.values() for p in v.values())
    ):
        sparsity = meta["sparsity"]
        print("# reusing the exported graphs in the workdir")
    else:
        dense = random_params(cfg)
        variants = {"dense": (0.0, dense)}
        for s in args.sparsities:
            p = pruned_params(dense, s, prune)
            variants[f"sparse{round(s * 100)}"] = (measured_sparsity(p), p)
        for name, (_, p) in variants.items():
            for g in args.graphs:
                fn = conv.export_decoder_decode if g == "decode" else conv.export_decoder_prefill
                fn(cfg, p, paths[g][name], head=False)
        sparsity = {name: s for name, (s, _) in variants.items()}
        del dense, variants
        gc.collect()
        with open(meta_path, "w") as f:
            json.dump({"key": [args.layers, pruner_name], "sparsity": sparsity}, f)
    print(f"# exported {sum(len(v) for v in paths.values())} graphs in {time.time() - t0:.0f}s")

    ceiling = {} if args.no_ceiling else measure_ceiling(cfg, args, prune, wd)
    summary = {
        "engine": "deepsparse",
        "ceiling_paired": ceiling,
        "pruner": pruner_name,
        "seq": args.seq,
        "layers": args.layers,
        "outputs_match": None,
        "graphs": {},
    }
    lines = []
    try:
        for g in args.graphs:
            feeds = (
                ds.decode_inputs(cfg, batch=1, past=args.seq)
                if g == "decode"
                else ds.prefill_inputs(cfg, batch=1, seq=args.seq)
            )
            runs = args.decode_runs if g == "decode" else args.prefill_runs
            engines = {
                n: ["deepsparse"] + (["onnxruntime"] if n == "dense" else []) for n in paths[g]
            }
            t1 = time.time()
            try:
                res = ds.benchmark_models(
                    paths[g],
                    feeds,
                    engines=engines,
                    warmup=2 if g == "decode" else 1,
                    runs=runs,
                    rounds=args.decode_rounds if g == "decode" else args.prefill_rounds,
                    num_cores=args.num_cores,
                    workdir=os.path.join(wd, f"run_{g}"),
                )
            except ds.OutputMismatchError as e:
                summary["outputs_match"] = False
                print(f"ERROR: {e}", file=sys.stderr)
                if args.json:
                    print(json.dumps(summary))
                return 3
            summary["outputs_match"] = True
            base = res["models"]["dense"]["engines"]["deepsparse"]
            gsum = {}
            for name, m in res["models"].items():
                for eng, t in m["engines"].items():
                    s = sparsity[name]
                    sp = base["median_ms"] / t["median_ms"]
                    paired = ds.paired_speedup(base, t)
                    comp = m["deepsparse_compile"]
                    target = TARGETS.get((g, round(s, 1))) if eng == "deepsparse" else None
                    gsum[f"{name}/{eng}"] = {
                        "sparsity": s,
                        "median_ms": t["median_ms"],
                        "min_ms": t["min_ms"],
                        "speedup": sp,
                        "speedup_paired": paired,
                        "speedup_min": base["min_ms"] / t["min_ms"],
                        "limit": ds.speedup_limit(s),
                        "ceiling": ceiling.get(g, {}).get(name),
                        "target": target,
                        "tokens_per_s": (args.seq if g == "prefill" else 1)
                        / (t["median_ms"] / 1e3),
                        "deepsparse_supported_pct": comp["supported_pct"],
                        "deepsparse_subgraphs": comp["subgraphs"],
                        "max_abs_diff_vs_ort": max(
                            o["max_abs_diff"] for o in m["outputs"].values()
                        ),
                    }
                    lines.append((g, name, eng, gsum[f"{name}/{eng}"], comp))
            summary["graphs"][g] = gsum
            print(f"# {g}: checked and timed in {time.time() - t1:.0f}s")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(wd, ignore_errors=True)

    hdr = (
        f"{'graph':8} {'model':9} {'engine':12} {'sparsity':>8} {'median ms':>10} {'min ms':>8} "
        f"{'speedup':>8} {'paired':>7} {'of min':>7} {'limit':>6} {'ceiling':>8} {'of ceil':>7} "
        f"{'target':>7} {'DS graph %':>10} {'subgr':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for g, name, eng, r, comp in lines:
        tgt = f"{r['target']:.2f}x" if r["target"] else ""
        ceil = f"{r['ceiling']:.2f}x" if r["ceiling"] and eng == "deepsparse" else ""
        of_ceil = f"{r['speedup_paired'] / r['ceiling']:.2f}" if ceil else ""
        pct = f"{comp['supported_pct']:.1f}" if comp["supported_pct"] is not None else "?"
        print(
            f"{g:8} {name:9} {eng:12} {r['sparsity']:8.3f} {r['median_ms']:10.1f} {r['min_ms']:8.1f} "
            f"{r['speedup']:7.2f}x {r['speedup_paired']:6.2f}x {r['speedup_min']:6.2f}x {r['limit']:5.2f}x "
            f"{ceil:>8} {of_ceil:>7} {tgt:>7} {pct:>10} {comp['subgraphs']!s:>5}"
        )
    print(
        "(speedups vs DeepSparse dense in the same run: of medians; 'paired' = median over interleaved "
        "rounds of per-round ratios; 'of min' = ratio of fastest runs; limit = 1/(1-s); ceiling = "
        "paired speedup of the bare MLP matmuls on this machine; 'of ceil' = paired / ceiling)"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

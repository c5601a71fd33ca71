"""`ellava bench-cpu`: DeepSparse timing of pruned models against dense, outputs checked first."""

from __future__ import annotations

import json

NAME = "bench-cpu"
HELP = "Time the decoders of a dense model and pruned ones in DeepSparse (onnxruntime as dense baseline)."


def add_arguments(p):
    p.add_argument(
        "--model",
        required=True,
        help="the dense baseline: toy | tiny | tiny-llama | smollm2 | HF LLaVA or "
        "LlamaForCausalLM directory",
    )
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="pruned models (HF directories of the same architecture) to time against it",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="prefill length and decode context (default: min(256, max_position_embeddings "
        "// 2) over the models, which leaves the decode step its extra position; 128 on the "
        "toy); a length the models' context cannot hold is refused before any export",
    )
    p.add_argument("--graphs", default="prefill,decode", help="prefill,decode or either")
    p.add_argument("--num-cores", type=int, default=None, help="DeepSparse cores (default: all)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (warm-up excluded)")
    p.add_argument("--runs", type=int, default=2, help="runs per round")
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from convert.deepsparse import OutputMismatchError, bench_cpu
    from ellava_jax.app.models import load_config, load_model

    models = [args.model, *args.compare]
    try:
        res = bench_cpu(
            models,
            load=load_model,
            load_config=load_config,
            seq_len=args.seq_len,
            graphs=tuple(args.graphs.split(",")),
            num_cores=args.num_cores,
            rounds=args.rounds,
            runs=args.runs,
        )
    except OutputMismatchError as e:
        print(f"ellava bench-cpu: refusing to report timings: {e}")
        if args.json:
            print(json.dumps({"outputs_match": False, "engine": "deepsparse", "error": str(e)}))
        return 3
    res["speedup"] = {}
    for g, rows in res["graphs"].items():
        print(f"{g} ({res['seq_len']} tokens{' of context' if g == 'decode' else ''}):")
        print(
            f"  {'model':<40} {'sparsity':>8} {'median ms':>10} {'tokens/s':>9} {'speedup':>8} {'limit':>6}"
        )
        for m, r in rows.items():
            print(
                f"  {m:<40} {r['sparsity']:8.3f} {r['median_ms']:10.2f} {r['tokens_per_s']:9.1f} "
                f"{r['speedup']:7.2f}x {r['limit']:5.2f}x"
            )
            res["speedup"].setdefault(m, {})[g] = r["speedup"]
        base = next(iter(rows.values()))
        if "onnxruntime_median_ms" in base:
            print(f"  onnxruntime, dense: {base['onnxruntime_median_ms']:.2f} ms")
    if args.json:
        print(json.dumps(res))
    return 0

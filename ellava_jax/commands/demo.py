"""`ellava demo`: the whole journey on the shipped toy (or tiny), cached by content, then the report."""

from __future__ import annotations

from ellava_jax.errors import UserError
from ellava_jax.outputs import add_overwrite_flag

NAME = "demo"
HELP = (
    "Dense evaluation; uniform SparseGPT and the EfficientLLaVA search per p0; export and "
    "DeepSparse timing; FitPrune on top of the p0 = 0.5 model; the report. Finished steps are "
    "reused (content keys), an interrupted run resumes."
)


def _p0_list(s: str) -> list[float]:
    try:
        p0s = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--p0 {s!r}: expected comma-separated numbers, e.g. 0.3,0.4,0.5") from None
    bad = [p for p in p0s if not 0.0 < p < 1.0]
    if not p0s or bad:
        raise UserError(f"--p0 {s!r}: give target sparsities in (0, 1), e.g. 0.3,0.4,0.5")
    return p0s


def add_arguments(p):
    p.add_argument("--model", default="toy", help="toy (default) | tiny | HF LLaVA directory")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    add_overwrite_flag(p)
    p.add_argument("--p0", default="0.3,0.4,0.5", help="target sparsities (default 0.3,0.4,0.5)")
    p.add_argument(
        "--skip-cpu-bench",
        action="store_true",
        help="leave out the ONNX export + DeepSparse timing (the report says so)",
    )
    p.add_argument(
        "--bench-seq-len", type=int, default=64, help="tokens of the timed prefill (default 64)"
    )
    p.add_argument("--population", type=int, default=None, help="override the recipes' population")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="search rounds per p0 (default: the recipe's, 10, as `ellava search` runs them)",
    )
    p.add_argument(
        "--eval-limit", type=int, default=None, help="evaluate on the first N test questions"
    )


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from ellava_jax.app.demo import run_demo
    from ellava_jax.app.models import resolve_model_dir
    from ellava_jax.outputs import claim_output, prepare_in_place, weight_bytes

    p0s = _p0_list(args.p0)
    model_dir = resolve_model_dir(args.model)
    out = claim_output(
        args.out,
        NAME,
        overwrite=args.overwrite,
        models=[model_dir],
        need_bytes=3 * len(p0s) * weight_bytes(model_dir),  # per p0: the search's outputs
        in_place=True,
    )
    prepare_in_place(out, NAME, overwrite=args.overwrite)

    overrides = {}
    if args.population is not None:
        overrides["population"] = args.population
        overrides["top_k"] = min(args.population, 8)
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    return run_demo(
        out,
        args.model,
        p0s,
        skip_cpu_bench=args.skip_cpu_bench,
        overrides=overrides,
        bench_seq_len=args.bench_seq_len,
        eval_limit=args.eval_limit,
    )

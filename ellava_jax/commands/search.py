"""`ellava search`: the EfficientLLaVA search (the main job)."""

from __future__ import annotations

import json

from ellava_jax.outputs import add_overwrite_flag

NAME = "search"
HELP = "EfficientLLaVA: search a per-layer pruning policy with search-space evolution, prune, evaluate."


def add_arguments(p):
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument(
        "--out",
        required=True,
        help="run directory; a rerun with the same settings resumes (or returns the finished "
        "result), other settings are refused",
    )
    add_overwrite_flag(p)
    p.add_argument(
        "--ablation",
        default="full",
        choices=["full", "auto_wo_gen", "no_evo", "evo_wo_ub", "uniform"],
        help="the paper's ablations (Tables 1-2)",
    )
    p.add_argument("--model", default=None, help="override the recipe's model")
    p.add_argument("--p0", type=float, default=None, help="override the target sparsity")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    p.add_argument(
        "--json", action="store_true", help="print result.json's summary as the last line"
    )


def run(args) -> int:
    from ellava_jax.models import resolve_model_dir
    from ellava_jax.outputs import claim_output, weight_bytes
    from ellava_jax.search.run import run_search
    from ellava_jax.search.settings import ABLATIONS, load_settings

    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "p0": args.p0,
            "rounds": args.rounds,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    settings = load_settings(args.config, **overrides)
    settings = settings.replace(**ABLATIONS[args.ablation])
    model_dir = resolve_model_dir(settings.model)
    claim_output(
        args.out,
        NAME,
        overwrite=args.overwrite,
        inputs=[settings.proxy_text, settings.proxy_multimodal, settings.eval_data],
        models=[model_dir],
        # model/, uniform/ (HF) and checkpoint/ (orbax): three copies of the weights
        need_bytes=3 * weight_bytes(model_dir),
        in_place=True,
    )
    evaluate = None
    if not args.no_eval:
        from ellava_jax.eval.harness import default_evaluator

        evaluate = default_evaluator(settings)
    result = run_search(settings, args.out, evaluate=evaluate, fresh=args.overwrite)
    acc = result["accuracy"]
    print(f"policy: {result['policy']}")
    print(
        f"mean sparsity: {result['mean_sparsity']:.4f} (measured {result['measured_sparsity']:.4f})"
    )
    if acc:
        print("accuracy: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in acc.items()))
    print(f"OBS calls: {result['obs_calls']}; wrote {args.out}/result.json")
    if args.json:
        print(
            json.dumps({k: result[k] for k in ("policy", "mean_sparsity", "accuracy", "obs_calls")})
        )
    return 0

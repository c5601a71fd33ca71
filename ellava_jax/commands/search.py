"""`ellava search`: the EfficientLLaVA search (the main job)."""

from __future__ import annotations

import json

from ellava_jax import distributed
from ellava_jax.outputs import add_overwrite_flag

NAME = "search"
HELP = "EfficientLLaVA: search a per-layer pruning policy with search-space evolution, prune, evaluate."


def add_arguments(p):
    # imported here, not at the top: `ellava --help` imports every command module
    import argparse

    from ellava_jax.search.settings import ABLATIONS, describe_settings, shipped_recipes

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "search settings (a recipe's keys; `--set KEY=VALUE` overrides one, the value read as "
        "YAML:\n0.6, true, null, [1, 2], {data: 2}; the ablation is applied last):\n"
        + describe_settings()
    )
    names = ", ".join(shipped_recipes())
    p.add_argument(
        "--config",
        required=True,
        help=f"YAML recipe: a file, or the name of a shipped recipe ({names}; with or without "
        ".yaml)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory; a rerun with the same settings resumes (or returns the finished "
        "result), other settings are refused",
    )
    add_overwrite_flag(p)
    p.add_argument(
        "--set",
        dest="set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting of the recipe (repeatable); the settings are listed below",
    )
    p.add_argument(
        "--ablation",
        default="full",
        choices=list(ABLATIONS),
        help="the paper's ablations (Tables 1-2)",
    )
    p.add_argument("--model", default=None, help="--set model=MODEL")
    p.add_argument("--p0", default=None, help="--set p0=P0 (the target sparsity)")
    p.add_argument("--rounds", default=None, help="--set rounds=ROUNDS")
    p.add_argument("--seed", default=None, help="--set seed=SEED")
    p.add_argument("--mesh", default=None, help="--set mesh=MESH: axis sizes, e.g. data=2,model=4")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    p.add_argument(
        "--json", action="store_true", help="print result.json's summary as the last line"
    )
    distributed.add_arguments(p)


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from ellava_jax.app.models import resolve_model_dir
    from ellava_jax.app.search import run_search
    from ellava_jax.outputs import claim_output, weight_bytes
    from ellava_jax.search.settings import ABLATIONS, command_line_overrides, load_settings

    flags = {
        "model": args.model,
        "p0": args.p0,
        "rounds": args.rounds,
        "seed": args.seed,
        "mesh": args.mesh,
    }
    overrides, origins = command_line_overrides(args.set, flags)
    settings = load_settings(args.config, overrides, origins=origins)
    settings = settings.replace(**ABLATIONS[args.ablation])
    model_dir = resolve_model_dir(settings.model)
    distributed.agree(  # process 0 checks and claims the run directory for all
        lambda: claim_output(
            args.out,
            NAME,
            overwrite=args.overwrite,
            inputs=[settings.proxy_text, settings.proxy_multimodal, settings.eval_data],
            models=[model_dir],
            # model/, uniform/ (HF) and checkpoint/ (orbax): three copies of the weights
            need_bytes=3 * weight_bytes(model_dir),
            in_place=True,
        )
    )
    evaluate = None
    if not args.no_eval:
        from ellava_jax.app.sources import default_evaluator

        evaluate = default_evaluator(settings, model_dir)
    result = run_search(settings, args.out, evaluate=evaluate, fresh=args.overwrite)
    if not distributed.is_main():
        return 0
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

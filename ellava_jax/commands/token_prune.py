"""`ellava token-prune`: fit a FitPrune visual-token recipe for a prefill FLOPs budget."""

from __future__ import annotations

import json
import time

from ellava_jax.errors import UserError
from ellava_jax.outputs import add_overwrite_flag

NAME = "token-prune"
HELP = (
    "Fit a FitPrune recipe (visual tokens kept per decoder layer) that cuts the decoder's "
    "prefill FLOPs by --flops-reduction, from attention statistics of a small calibration batch."
)


def add_arguments(p):
    p.add_argument(
        "--model",
        default="tiny",
        help="toy | tiny | path to an HF LLaVA directory (not a text-only LLaMA)",
    )
    p.add_argument(
        "--flops-reduction",
        type=float,
        default=0.5,
        help="share of the decoder's prefill FLOPs to remove, in [0, 1) (default 0.5)",
    )
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument(
        "--score",
        default="text",
        choices=["text", "text_x_visual"],
        help="how tokens are ranked at inference: attention from text tokens (default), or "
        "that times the attention from the image's own visual tokens",
    )
    p.add_argument(
        "--flops-scope",
        default="visual",
        choices=["visual", "prompt"],
        help="what the reduction is of: the FLOPs of the visual tokens alone (default, "
        "FitPrune's accounting), or the decoder's whole prefill of the reference prompt",
    )
    p.add_argument(
        "--start-layer",
        type=int,
        default=None,
        help="first decoder layer that drops tokens (default: 0, 1 or 2, whichever recipe "
        "changes the calibration batch's next-token distributions least)",
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="text tokens of the reference prompt the budget is computed for "
        "(default: the calibration samples' mean)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="jsonl of image + text rows ('image': path relative to the file, 'text': the "
        "instruction) to fit on; default: random prompts for tiny, the toy's proxy samples",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the --calibration file's images may come from (default: the jsonl's own "
        "folder; paths that leave it are refused)",
    )
    p.add_argument("--seed", type=int, default=0, help="calibration sample seed")
    p.add_argument("--batch-size", type=int, default=8, help="calibration rows per batch")
    p.add_argument("--out", required=True, help="where to write the recipe (JSON)")
    add_overwrite_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from ellava_jax.app.models import load_config, load_model, resolve_model_dir
    from ellava_jax.app.sources import fitprune_calibration
    from ellava_jax.eval.flops import flops_reduction
    from ellava_jax.outputs import claim_output
    from ellava_jax.tokens.fit import fit_recipe

    if args.samples < 1:
        raise UserError(f"--samples={args.samples} must be at least 1")
    if load_config(args.model).is_text_only:
        raise UserError(
            f"--model {args.model}: a text-only LLaMA has no visual tokens to prune; "
            "token-prune takes a LLaVA"
        )
    out = claim_output(
        args.out,
        NAME,
        overwrite=args.overwrite,
        inputs=[args.calibration],
        models=[resolve_model_dir(args.model)],
        kind="file",
    )
    t0 = time.perf_counter()
    config, params, path = load_model(args.model)
    t_load = time.perf_counter() - t0
    cal = fitprune_calibration(
        config, path, args.samples, args.seed, args.calibration, image_root=args.image_root
    )
    recipe = fit_recipe(
        config,
        params,
        cal,
        args.flops_reduction,
        score=args.score,
        flops_scope=args.flops_scope,
        text_tokens=args.text_tokens,
        batch_size=args.batch_size,
        start_layer=args.start_layer,
    )
    recipe.save(out)
    prompt_reduction = flops_reduction(config, recipe.text_tokens, recipe.images, recipe.keep)
    summary = {
        "model": path or args.model,
        "out": args.out,
        "flops_reduction": round(recipe.flops_reduction, 4),
        "target_reduction": recipe.target_reduction,
        "alpha": recipe.alpha,
        "keep": list(recipe.keep),
        "visual_tokens": config.num_image_tokens,
        "flops_scope": recipe.flops_scope,
        "prompt_flops_reduction": round(prompt_reduction, 4),
        "start_layer": recipe.start_layer,
        "divergence": {k: round(v, 5) for k, v in recipe.divergence.items()},
        "reference_prompt": {"text_tokens": recipe.text_tokens, "images": recipe.images},
        "samples": recipe.samples,
        "recipe_seconds": round(recipe.seconds, 3),
        "load_s": round(t_load, 3),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>18}: {v}")
    return 0

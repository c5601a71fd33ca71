"""`ellava prune`: SparseGPT / Wanda / magnitude pruning of the decoder, written as an HF directory."""

from __future__ import annotations

import json
import os

from ellava_jax import distributed
from ellava_jax.outputs import add_overwrite_flag

# OWL's defaults (luuyin/OWL, llm-compressor); ellava_jax.prune.owl holds the same numbers
OWL_M = 5.0
OWL_LAMBDA = 0.08

NAME = "prune"
HELP = (
    "Prune the LLaMA decoder's linear weights (uniformly or per a policy) and write an HF LLaVA "
    "directory (a LlamaForCausalLM one for a text-only LLaMA)."
)


def add_arguments(p):
    p.add_argument(
        "--model",
        required=True,
        help="toy | tiny | tiny-llama | smollm2 | path to an HF LLaVA or LlamaForCausalLM "
        "directory",
    )
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument(
        "--sparsity", type=float, default=0.5, help="uniform sparsity of every decoder linear"
    )
    p.add_argument(
        "--policy",
        default=None,
        help="JSON policy (per-layer list, per-matrix lists or dict, or a search result)",
    )
    p.add_argument(
        "--nm", default=None, help="N:M structured sparsity, e.g. 2:4 (overrides --sparsity)"
    )
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=["uniform", "owl"],
        help="uniform: --sparsity (or --policy) as given; owl: per-layer sparsities from each "
        "layer's share of outlier Wanda scores on the dense model (OWL), with mean --sparsity",
    )
    p.add_argument(
        "--owl-m",
        type=float,
        default=None,
        help=f"OWL: a score is an outlier above M times its layer's mean (default {OWL_M:g})",
    )
    p.add_argument(
        "--owl-lambda",
        type=float,
        default=None,
        help="OWL: the layers' sparsities span 2*lambda around --sparsity "
        f"(default {OWL_LAMBDA:g})",
    )
    p.add_argument(
        "--proxy",
        default=None,
        help="proxy text (.txt or .jsonl with 'text'), or bible (the World English Bible's Old "
        "Testament; a file named bible: ./bible); default: the model's own (random tokens for tiny "
        "and tiny-llama; a text-only LLaMA is calibrated on text only)",
    )
    p.add_argument("--nsamples", type=int, default=64, help="proxy segments (paper: 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per segment (paper: 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples per calibration chunk")
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=2,model=4: the weights split over model (calibration "
        "partitioned; each matrix pruned whole on one device); default: one device",
    )
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    add_overwrite_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    distributed.add_arguments(p)


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from convert.hf import write_hf_llava
    from ellava_jax.app.models import load_model, resolve_model_dir
    from ellava_jax.app.sources import prune_calibration
    from ellava_jax.outputs import atomic_directory, claim_output, weight_bytes
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.prune.masks import (
        format_summary,
        load_policy,
        masks_from_params,
        mean_sparsity,
        policy_to_sparsities,
        save_masks,
        sparsity_summary,
    )
    from ellava_jax.prune.owl import owl_from_ratios, owl_outlier_ratios
    from ellava_jax.prune.pipeline import parse_nm, prune_model

    nm = parse_nm(args.nm)
    owl = _owl_settings(args)
    policy = load_policy(args.policy) if args.policy else args.sparsity
    say = distributed.quiet(print)
    model_dir = resolve_model_dir(args.model)
    out = distributed.agree(  # process 0 checks and claims the output for all
        lambda: claim_output(
            args.out,
            NAME,
            overwrite=args.overwrite,
            inputs=[args.policy, args.proxy],
            models=[model_dir],
            need_bytes=weight_bytes(model_dir),
        )
    )
    config, params, model_dir = load_model(args.model)
    if args.mesh is not None or distributed.process_count() > 1:
        from ellava_jax.mesh import make_mesh, mesh_notes, shard_params

        mesh = make_mesh(args.mesh)  # several processes, no --mesh: all on data
        params = shard_params(config, params, mesh)
        for line in mesh_notes(config, mesh):
            say(f"mesh: {line}")
    calib = None
    if args.method != "magnitude" or owl is not None:
        calib = build_calibration_set(
            config,
            params,
            prune_calibration(config, model_dir, args.proxy, args.nsamples, args.seqlen, args.seed),
            args.batch_size,
        )
    if owl is not None:
        # one dense calibration pass for the input norms, then the layers' sparsities
        owl["outlier_ratios"] = owl_outlier_ratios(
            config, params, calib, owl["m"], batch_size=args.batch_size
        )
        owl["layer_sparsities"] = policy = owl_from_ratios(
            owl["outlier_ratios"], owl["p0"], owl["lambda"]
        )
        say(
            f"OWL layer sparsities (mean {owl['p0']:g}, M {owl['m']:g}, lambda "
            f"{owl['lambda']:g}): " + " ".join(f"{s:.4f}" for s in policy)
        )
    sparsities = policy_to_sparsities(config, policy)
    pruned, stats = prune_model(
        config,
        params,
        sparsities,
        args.method,
        calib,
        nm=nm,
        batch_size=args.batch_size,
        progress=distributed.is_main(),
    )
    summary = sparsity_summary(config, pruned)
    masks = masks_from_params(config, pruned)
    if distributed.process_count() > 1:  # process 0 writes alone, from its host's copies
        import jax

        from ellava_jax.mesh import to_host

        pruned, masks = jax.tree.map(to_host, (pruned, masks))
        if not distributed.is_main():
            distributed.barrier("prune written")
            return 0
    with atomic_directory(out, NAME) as tmp:
        write_hf_llava(tmp, config, pruned, copy_from=model_dir)
        save_masks(os.path.join(tmp, "masks.npz"), masks)
        report = {
            "model": model_dir or args.model,
            "method": args.method,
            "allocation": args.allocation,
            "nm": args.nm,
            "requested_mean_sparsity": None if nm != (0, 0) else mean_sparsity(config, sparsities),
            "sparsity": summary,
            "pruner_calls": stats.pruner_calls,
            "seconds": stats.seconds,
            "calibration_samples": None if calib is None else calib.n_samples,
        }
        if owl is not None:
            report["owl"] = owl | {"measured_mean_sparsity": summary["overall"]}
        with open(os.path.join(tmp, "sparsity.json"), "w") as f:
            json.dump(report, f, indent=1)
    distributed.barrier("prune written")
    print(format_summary(summary))
    print(f"wrote {out} ({stats.pruner_calls} pruner calls, {stats.seconds:.1f} s)")
    if args.json:
        print(
            json.dumps(
                {k: report[k] for k in ("method", "pruner_calls", "seconds")}
                | {"overall_sparsity": summary["overall"]}
            )
        )
    return 0


def _owl_settings(args) -> dict | None:
    """OWL's settings from the flags (None for --allocation uniform); refuses combinations
    that do not go together, before anything is written."""
    from ellava_jax.errors import UserError

    given = [
        f for f, v in (("--owl-m", args.owl_m), ("--owl-lambda", args.owl_lambda)) if v is not None
    ]
    if args.allocation != "owl":
        if given:
            raise UserError(f"{' and '.join(given)} apply only with --allocation owl")
        return None
    if args.policy:
        raise UserError("--allocation owl chooses the layers' sparsities itself; drop --policy")
    if args.nm:
        raise UserError("--allocation owl needs unstructured sparsity (--sparsity); drop --nm")
    m = OWL_M if args.owl_m is None else args.owl_m
    lam = OWL_LAMBDA if args.owl_lambda is None else args.owl_lambda
    if not m > 0:
        raise UserError(f"--owl-m {m:g}: expected a number > 0")
    if not 0 <= lam < 0.5:
        raise UserError(f"--owl-lambda {lam:g}: expected a number in [0, 0.5)")
    if not 0 <= args.sparsity < 1:
        raise UserError(f"--sparsity {args.sparsity:g}: expected a number in [0, 1)")
    return {"p0": args.sparsity, "m": m, "lambda": lam}

"""`ellava eval`: multiple-choice accuracy (overall and per category), proxy perplexity and
held-out perplexity (`--heldout bible|FILE`)."""

from __future__ import annotations

import json

NAME = "eval"
HELP = (
    "Evaluate a LLaVA model on multiple-choice VQA (jsonl, or the toy's test split) and proxy "
    "perplexity; a plain LLaMA on records without images and held-out perplexity."
)


def add_arguments(p):
    p.add_argument(
        "--model",
        default="toy",
        help="toy | path to an HF LLaVA or LlamaForCausalLM directory (text-only: --data FILE "
        "of records without images, or --data none)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="jsonl records (question, choices, answer, category, image?, context?); default: "
        "the toy's test split; none: no multiple-choice part (perplexity only, e.g. a model "
        "without images; needs --heldout or --proxy)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="the folder the --data file's images may come from (default: the jsonl's own "
        "folder). Image paths are relative to the jsonl's folder, or absolute, and must end "
        "inside this folder once symbolic links are resolved",
    )
    p.add_argument("--scoring", default="generate", choices=["generate", "likelihood"])
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--proxy", default=None, help="proxy text for perplexity (default: the toy's own)"
    )
    p.add_argument(
        "--heldout",
        default=None,
        help="held-out text for perplexity: bible (128 fixed windows of 256 tokens, 32,768 in "
        "all, from Matthew and Mark: New Testament, never in the bible proxy) or a text / jsonl "
        "file (every whole --seq-len window from its start; a file named bible: ./bible)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=256,
        help="tokens per --heldout window (bible: ceil(32768 / seq-len) windows)",
    )
    p.add_argument(
        "--token-recipe",
        default=None,
        help="FitPrune recipe JSON: prune visual tokens during prefill",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    from ellava_jax.app import sources
    from ellava_jax.app.models import TOY_NAME, load_model, resolve_model_dir
    from ellava_jax.config import LlavaConfig
    from ellava_jax.data import bible
    from ellava_jax.data import prompt as T
    from ellava_jax.errors import UserError
    from ellava_jax.eval import harness
    from ellava_jax.inputs import check_dir, check_file

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit={args.limit}: evaluate at least 1 record")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size}: must be at least 1")
    if args.image_root is not None:
        check_dir(args.image_root, "image root directory")
    no_choices = args.data == "none"
    if no_choices and not (args.heldout or args.proxy):
        raise UserError("--data none: nothing left to evaluate; add --heldout or --proxy")
    if no_choices and args.token_recipe:
        raise UserError("--token-recipe prunes visual tokens of --data's prompts; not with none")
    heldout_file = args.heldout if args.heldout != bible.NAME else None
    for flag, path in (
        ("--proxy", args.proxy),
        ("--heldout", heldout_file),
        ("--token-recipe", args.token_recipe),
    ):
        if path is not None:
            check_file(path, f"{flag} file")
    model_dir = resolve_model_dir(args.model)
    if model_dir is None:
        raise UserError(
            f"--model {args.model} has no tokenizer: evaluate 'toy' or an HF LLaVA or "
            "LlamaForCausalLM directory"
        )
    dir_config = LlavaConfig.from_hf_config(model_dir)
    if dir_config.is_text_only:
        _check_text_only(args, model_dir)
    # the data is checked whole (records, image paths, held-out text) before the model is loaded
    if no_choices:
        records, path = None, None
    elif dir_config.is_text_only:  # a record with an image is refused before its image is read
        records, path = harness.load_eval_records(
            args.data, args.limit, args.image_root, config=dir_config
        )
    else:
        records, path = sources.eval_records(args.data, args.limit, args.image_root)
    heldout = None
    if args.heldout:
        heldout = sources.heldout_windows(dir_config, model_dir, args.heldout, args.seq_len)
    config, params, model_dir = load_model(args.model)
    tok = T.load_tokenizer(model_dir)
    logits_fn = None
    if args.token_recipe:
        from ellava_jax.tokens import load_recipe, recipe_last_logits

        recipe = load_recipe(args.token_recipe, config)
        logits_fn = recipe_last_logits(recipe)
    res = (
        {}
        if no_choices
        else harness.evaluate_records(
            config,
            params,
            tok,
            records,
            jsonl_path=path,
            model_dir=model_dir,
            scoring=args.scoring,
            batch_size=args.batch_size,
            logits_fn=logits_fn,
            image_root=args.image_root,
        )
    )
    res["model"] = model_dir
    if not no_choices:
        res["decoder_prefill_flops"] = _prefill_flops(
            config, params, tok, records, recipe.keep if args.token_recipe else None
        )
    if args.proxy:
        from transformers import AutoTokenizer

        from ellava_jax.data.segments import proxy_segments

        ids, mask = proxy_segments(args.proxy, AutoTokenizer.from_pretrained(model_dir), 32, 128)
        res["proxy_perplexity"] = harness.perplexity(config, params, ids, mask)
    elif args.model == TOY_NAME or args.data is None:
        res["proxy_perplexity"] = sources.toy_perplexity(config, params, tok)
    if heldout is not None:
        ids, mask, info = heldout
        res["heldout"] = {**info, "perplexity": harness.perplexity(config, params, ids, mask)}
    if not no_choices:
        print(f"accuracy {res['accuracy']:.4f} on {res['n']} questions ({res['scoring']})")
        for cat, acc in res["per_category"].items():
            print(f"  {cat:>10}: {acc:.4f} (n={res['per_category_n'][cat]})")
    f = res.get("decoder_prefill_flops")
    if f is not None:
        print(
            f"decoder prefill FLOPs per image prompt ({f['text_tokens']} text tokens): "
            f"{f['model']:.4g} vs dense {f['dense']:.4g} ({f['reduction']:.1%} less; weights "
            f"{f['reduction_weights']:.1%}, visual tokens {f['reduction_tokens']:.1%})"
        )
    if "proxy_perplexity" in res:
        print(f"proxy perplexity {res['proxy_perplexity']:.3f}")
    if heldout is not None:
        h = res["heldout"]
        books = f" ({', '.join(h['books'])})" if "books" in h else ""
        print(
            f"held-out perplexity {h['perplexity']:.3f} on {h['source']}{books}: "
            f"{h['windows']} windows x {h['seq_len']} tokens ({h['tokens']} tokens, "
            f"{h['predicted_tokens']} predicted)"
        )
    if args.json:
        print(json.dumps(res))
    return 0


def _check_text_only(args, model_dir: str) -> None:
    """What a text-only LLaMA cannot take: the toy's test split (every record has an image)
    and a FitPrune recipe (it prunes visual tokens)."""
    from ellava_jax.errors import UserError

    if args.data in (None, "toy", "toy-test"):
        raise UserError(
            f"{model_dir}: a text-only LLaMA; the toy's test split has images. Give --data FILE "
            "(records without 'image') or --data none with --heldout FILE|bible"
        )
    if args.token_recipe:
        raise UserError(
            f"--token-recipe: {model_dir} is a text-only LLaMA, with no visual tokens to prune"
        )


def _prefill_flops(config, params, tok, records, keep) -> dict | None:
    """Analytic decoder prefill FLOPs of the evaluated model (its measured weight sparsity, and
    the token recipe's `keep`) against the dense model, for the mean image prompt of `records`."""
    from ellava_jax.data import prompt as T
    from ellava_jax.eval.flops import decoder_prefill_flops, sparsity_of_params, total_flops

    with_image = [r for r in records if r.has_image]
    if not with_image:
        return None
    n = config.num_image_tokens
    text = round(sum(len(T.encode_record(tok, r, n)[0]) - n for r in with_image) / len(with_image))
    sparsity = sparsity_of_params(config, params)

    def flops(keep_, sparsity_):
        return total_flops(decoder_prefill_flops(config, text, 1, keep_, sparsity_))

    dense, model = flops(None, None), flops(keep, sparsity)
    return {
        "text_tokens": text,
        "images": 1,
        "dense": dense,
        "model": model,
        "reduction": 1.0 - model / dense,
        "reduction_weights": 1.0 - flops(None, sparsity) / dense,
        "reduction_tokens": 1.0 - flops(keep, None) / dense,
    }

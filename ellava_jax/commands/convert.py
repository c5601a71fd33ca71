"""`ellava convert`: read an HF LLaVA directory into Flax params and write it back out, or turn
a llama.cpp GGUF LLaMA file into an HF LlamaForCausalLM directory (`--gguf`)."""

from __future__ import annotations

from ellava_jax.outputs import add_overwrite_flag

NAME = "convert"
HELP = (
    "Check and re-write an HF LLaVA directory through the Flax params (optionally as bfloat16 / "
    "sharded), or convert a GGUF LLaMA file (--gguf) into an HF directory."
)


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="toy | tiny | tiny-llama | smollm2 | path to an HF LLaVA or LlamaForCausalLM directory",
    )
    src.add_argument(
        "--gguf",
        metavar="FILE",
        help="a llama.cpp GGUF LLaMA (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, byte-level BPE "
        "tokenizer): written as an HF LlamaForCausalLM directory with its tokenizer",
    )
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    add_overwrite_flag(p)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--max-shard-gb", type=float, default=None, help="shard the safetensors")


def run(args) -> int:
    if args.gguf is not None:
        return _run_gguf(args)
    # imported here, not at the top: `ellava --help` imports every command module
    import jax
    import jax.numpy as jnp

    from convert.hf import save_hf_llava
    from ellava_jax.app.models import load_model, resolve_model_dir
    from ellava_jax.outputs import claim_output, weight_bytes

    model_dir = resolve_model_dir(args.model)
    grow = 2 if args.dtype == "float32" else 1  # a bfloat16 model written as float32
    out = claim_output(
        args.out,
        NAME,
        overwrite=args.overwrite,
        models=[model_dir],
        need_bytes=grow * weight_bytes(model_dir),
    )
    config, params, path = load_model(args.model, dtype=args.dtype and jnp.dtype(args.dtype))
    shard = None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
    save_hf_llava(out, config, params, copy_from=path, max_shard_bytes=shard, command=NAME)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: {n:,} parameters, {config.text.num_hidden_layers} decoder layers")
    return 0


def _run_gguf(args) -> int:
    from convert.gguf import convert_gguf
    from ellava_jax.errors import UserError

    if args.max_shard_gb is not None:
        raise UserError("--max-shard-gb applies to --model; --gguf writes one model.safetensors")
    config = convert_gguf(
        args.gguf, args.out, dtype=args.dtype or "float32", overwrite=args.overwrite, command=NAME
    )
    print(
        f"wrote {args.out}: LlamaForCausalLM, {config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, vocabulary {config['vocab_size']}, {config['torch_dtype']}"
    )
    return 0

"""`ellava convert`: read an HF LLaVA directory into Flax params and write it back out."""

from __future__ import annotations

NAME = "convert"
HELP = "Check and re-write an HF LLaVA directory through the Flax params (optionally as bfloat16 / sharded)."


def add_arguments(p):
    p.add_argument("--model", required=True, help="toy | tiny | path to an HF LLaVA directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--max-shard-gb", type=float, default=None, help="shard the safetensors")


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from convert.hf import save_hf_llava
    from ellava_jax.models import load_model

    config, params, path = load_model(args.model, dtype=args.dtype and jnp.dtype(args.dtype))
    shard = None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
    save_hf_llava(args.out, config, params, copy_from=path, max_shard_bytes=shard)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: {n:,} parameters, {config.text.num_hidden_layers} decoder layers")
    return 0

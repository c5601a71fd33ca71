"""`ellava export`: a (pruned) LLaVA to ONNX for CPU runtimes (DeepSparse 1.8, onnxruntime)."""

from __future__ import annotations

from ellava_jax.outputs import add_overwrite_flag

NAME = "export"
# The three graphs hold float32 weights: the toy (float32, 3.9 MB of safetensors) exports 10.1 MB,
# so a bfloat16 model needs about 5.2x its weight files; 6 leaves a margin.
EXPORT_BYTES_PER_WEIGHT_BYTE = 6
HELP = (
    "Export the decoder prefill, the one-token decode step (KV cache in/out) and the full LLaVA "
    "prefill to ONNX (a LlamaForCausalLM: the two decoder graphs, from input_ids)."
)


def add_arguments(p):
    p.add_argument(
        "--model",
        required=True,
        help="toy | tiny | tiny-llama | smollm2 | path to an HF LLaVA or LlamaForCausalLM "
        "directory (e.g. a pruned one)",
    )
    p.add_argument("--out", required=True, help="output directory for the .onnx files")
    add_overwrite_flag(p)
    p.add_argument(
        "--no-head", action="store_true", help="output the final hidden state instead of logits"
    )


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    import os

    import jax
    import numpy as np

    from convert.onnx import export_all
    from ellava_jax.app.models import load_model, resolve_model_dir
    from ellava_jax.outputs import atomic_directory, claim_output, weight_bytes

    model_dir = resolve_model_dir(args.model)
    out = claim_output(
        args.out,
        NAME,
        overwrite=args.overwrite,
        models=[model_dir],
        need_bytes=EXPORT_BYTES_PER_WEIGHT_BYTE * weight_bytes(model_dir),
    )
    with atomic_directory(out, NAME) as tmp:
        config, params, _ = load_model(args.model)
        params = jax.tree_util.tree_map(np.asarray, params)  # host arrays: the graphs' weights
        paths = export_all(config, params, tmp, head=not args.no_head)
    for name, path in paths.items():
        print(f"{name}: {os.path.join(out, os.path.basename(path))}")
    return 0

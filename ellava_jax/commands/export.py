"""`ellava export`: a (pruned) LLaVA to ONNX for CPU runtimes (DeepSparse 1.8, onnxruntime)."""

from __future__ import annotations

NAME = "export"
HELP = "Export the decoder prefill, the one-token decode step (KV cache in/out) and the full LLaVA prefill to ONNX."


def add_arguments(p):
    p.add_argument(
        "--model",
        required=True,
        help="toy | tiny | path to an HF LLaVA directory (e.g. a pruned one)",
    )
    p.add_argument("--out", required=True, help="output directory for the .onnx files")
    p.add_argument(
        "--no-head", action="store_true", help="output the final hidden state instead of logits"
    )


def run(args) -> int:
    import os

    from convert.onnx import export_model
    from ellava_jax.atomic import atomic_directory

    out = os.path.abspath(args.out)
    with atomic_directory(out) as tmp:
        paths = export_model(args.model, tmp, head=not args.no_head)
    for name, path in paths.items():
        print(f"{name}: {os.path.join(out, os.path.basename(path))}")
    return 0

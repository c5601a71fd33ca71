"""``python -m convert.onnx --model DIR --out OUT``: export an HF LLaVA (or LlamaForCausalLM)
directory to ONNX.

A directory only (a pruned one's zeros go through as zeros): the ``toy`` / ``tiny`` names are
the command layer's, which ``ellava export --model toy|tiny|tiny-llama|smollm2|DIR`` resolves.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from convert.hf import load_hf_llava
from convert.onnx import export_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m convert.onnx",
        description="Export a (pruned) LLaVA to ONNX: decoder prefill, decoder decode step, "
        "full LLaVA prefill (opset 14, IR version 8; DeepSparse 1.8 and onnxruntime); a "
        "LlamaForCausalLM: the two decoder graphs, from input_ids.",
    )
    ap.add_argument(
        "--model",
        required=True,
        help="an HF LLaVA or LlamaForCausalLM directory (`ellava export` also takes toy, tiny, "
        "tiny-llama and smollm2)",
    )
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--no-head", action="store_true", help="output the final hidden state")
    args = ap.parse_args(argv)
    if args.model in ("toy", "tiny", "tiny-llama", "smollm2"):
        ap.error(f"--model {args.model}: use `ellava export --model {args.model} --out DIR`")

    config, params = load_hf_llava(args.model)
    params = jax.tree_util.tree_map(np.asarray, params)
    for name, path in export_all(config, params, args.out, head=not args.no_head).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

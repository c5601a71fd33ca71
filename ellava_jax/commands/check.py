"""`ellava check`: load a model, run a forward pass and greedy generation, print what it saw."""

from __future__ import annotations

import json
import time

NAME = "check"
HELP = (
    "Load a model (toy, tiny, tiny-llama, smollm2, or an HF LLaVA or LlamaForCausalLM "
    "directory), run forward + generate, print a summary."
)
# the text prompt of a text-only model with a tokenizer
PROMPT = "The capital of France is"


MODEL_HELP = "toy | tiny | tiny-llama | smollm2 | path to an HF LLaVA or LlamaForCausalLM directory"


def add_arguments(p):
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print the summary as JSON (last line)")


def run(args) -> int:
    # imported here, not at the top: `ellava --help` imports every command module
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ellava_jax.app.models import load_model
    from ellava_jax.model import forward, generate

    t0 = time.perf_counter()
    config, params, path = load_model(args.model, dtype=args.dtype and jnp.dtype(args.dtype))
    t_load = time.perf_counter() - t0
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    t = config.text
    bos = t.bos_token_id if t.bos_token_id is not None else 1
    tok = None
    if config.is_text_only:  # a LLaMA causal LM: a text prompt, no pixel values
        tok = _tokenizer(path)
        if tok is not None:
            ids = np.array([tok(PROMPT)["input_ids"]])
        else:
            ids = np.array([[bos] + text_ids(config, 3)])
        pix = None
    else:
        v = config.vision
        rng = np.random.default_rng(0)
        ids = np.array(
            [[bos] + [config.image_token_index] * config.num_image_tokens + text_ids(config, 3)]
        )
        pix = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size))
        pix = pix.astype(np.float32)
    t0 = time.perf_counter()
    logits = np.asarray(forward(config, params, ids, pix))
    t_fwd = time.perf_counter() - t0
    out = generate(config, params, ids, pix, max_new_tokens=8)
    summary = {
        "model": path or args.model,
        "architecture": "LlamaForCausalLM"
        if config.is_text_only
        else "LlavaForConditionalGeneration",
        "parameters": n_params,
        "dtype": str(jax.tree_util.tree_leaves(params)[0].dtype),
    }
    if not config.is_text_only:
        summary["visual_tokens"] = config.num_image_tokens
    summary |= {
        "decoder_layers": config.text.num_hidden_layers,
        "logits_finite": bool(np.isfinite(logits).all()),
        "prompt_tokens": int(ids.shape[1]),
        "generated": out[0, ids.shape[1] :].tolist(),
    }
    if tok is not None:
        summary["prompt"] = PROMPT
        summary["generated_text"] = tok.decode(out[0, ids.shape[1] :].tolist())
    summary |= {"load_s": round(t_load, 3), "first_forward_s": round(t_fwd, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, val in summary.items():
            print(f"{k:>16}: {val}")
    return 0 if summary["logits_finite"] else 1


def text_ids(config, n: int = 3) -> list[int]:
    """n ordinary token ids for the prompt's text: the lowest from 3 up that are none of the
    config's special ids (image token, pad, bos, eos)."""
    t = config.text
    special = {config.image_token_index, t.pad_token_id, t.bos_token_id, t.eos_token_id}
    out = [i for i in range(3, t.vocab_size) if i not in special][:n]
    if len(out) < n:
        from ellava_jax.errors import UserError

        raise UserError(f"vocab_size={t.vocab_size} leaves fewer than {n} ordinary token ids")
    return out


def _tokenizer(path: str | None):
    """The tokenizer of a model directory that has one, else None."""
    import os

    if path is None or not any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer  # here: it takes seconds to import

    return AutoTokenizer.from_pretrained(path)

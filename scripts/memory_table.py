"""Memory each step of the EfficientLLaVA journey needs for LLaVA-1.5-7B and -13B, as a markdown table.

Sizes come from the real parameter trees (`param_shapes`, i.e. `jax.eval_shape`; nothing is
allocated) and from the shapes the search works on (docs/architecture.md and configs/llava-1.5-7b.yaml):
a level database of 5 levels, calibration Hessians in float32 per decoder layer, a population of
16 candidates streamed through the decoder one layer at a time on 64 x 256 proxy tokens, and the
projector trained with Adam on the top-8 candidates over 32 multimodal samples.

    python scripts/memory_table.py      # prints the table that docs/user-guide.md contains

GB = 10^9 bytes. Activations are counted in float32 (the upper bound; bf16 halves them).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = 5  # grid p0 - 0.1 : 0.05 : p0 + 0.1
POPULATION = 16
TOP_K = 8
PROXY_SEGMENTS, PROXY_LEN = 64, 256
MM_SAMPLES, MM_TEXT_TOKENS = 32, 64
MODELS = ("llava-1.5-7b", "llava-1.5-13b")
BF16, F32 = 2, 4


def _count(tree) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def sizes(name: str) -> dict[str, float]:
    """Bytes per row of the table for one preset."""
    from ellava_jax.config import get_preset
    from ellava_jax.model.llava import param_shapes
    from ellava_jax.prune.masks import MATRICES

    cfg = get_preset(name)
    t = cfg.text
    shapes = param_shapes(cfg)
    n_all = _count(shapes)
    layers = shapes["language_model"]["layers"]
    n_linear = sum(
        _count(layers[str(i)][mod][m]["kernel"])
        for i in range(t.num_hidden_layers)
        for mod, m in (x.split(".") for x in MATRICES)
    )
    n_layer = n_linear // t.num_hidden_layers
    n_proj = _count(shapes["multi_modal_projector"])
    h, i, heads, L = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_hidden_layers
    tokens = PROXY_SEGMENTS * PROXY_LEN
    mm_tokens = cfg.num_image_tokens + MM_TEXT_TOKENS
    hess_layer = (3 * h * h + i * i) * F32  # q/k/v in, o in, gate/up in: H^2; down in: I^2
    fit_kernels = POPULATION * n_layer * BF16
    fit_hidden = POPULATION * tokens * h * F32
    fit_mlp = POPULATION * tokens * i * F32
    fit_attn = POPULATION * PROXY_SEGMENTS * heads * PROXY_LEN * PROXY_LEN * F32
    proj_state = 4 * n_proj * F32  # params, grads, Adam m and v
    proj_acts = TOP_K * MM_SAMPLES * mm_tokens * h * L * F32  # residual stream kept for backprop
    fitness_total = fit_kernels + fit_hidden + max(fit_mlp, fit_attn)
    return {
        "params": n_all,
        "linear": n_linear,
        "bf16": n_all * BF16,
        "f32": n_all * F32,
        "hess_max": i * i * F32,
        "hess_layer": hess_layer,
        "hess_all": hess_layer * L,
        "database": LEVELS * n_linear * BF16,
        "fit_kernels": fit_kernels,
        "fit_hidden": fit_hidden,
        "fit_mlp": fit_mlp,
        "fit_attn": fit_attn,
        "proj_state": proj_state,
        "proj_acts": proj_acts,
        "device_peak": n_all * BF16 + max(hess_layer, fitness_total, proj_state + proj_acts),
    }


ROWS = [
    ("parameters (all / decoder linears)", None),
    ("`convert`, load: all params in bfloat16", "bf16"),
    ("all params in float32", "f32"),
    ("calibration: largest Hessian (down_proj input, I x I, f32)", "hess_max"),
    ("calibration: one layer's Hessians (3 x H x H + I x I, f32)", "hess_layer"),
    ("calibration: every layer's at once (never held)", "hess_all"),
    ("level database: 5 levels x decoder linears, bf16 (`database_storage: host`)", "database"),
    ("fitness, one streamed layer: 16 candidates' kernels, bf16", "fit_kernels"),
    ("fitness, one streamed layer: hidden states 16 x 64 x 256 x H, f32", "fit_hidden"),
    ("fitness, one streamed layer: MLP activations 16 x 64 x 256 x I, f32", "fit_mlp"),
    ("fitness, one streamed layer: attention probs 16 x 64 x heads x 256^2, f32", "fit_attn"),
    ("projector training: params + grads + Adam (f32)", "proj_state"),
    (
        "projector training: residual stream for backprop, 8 x 32 x (576 + 64) x H x layers, f32",
        "proj_acts",
    ),
    ("**accelerator peak of the search** (bf16 params + the largest step above)", "device_peak"),
]


def _gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB" if b >= 1e8 else f"{b / 1e6:,.1f} MB"


def table() -> str:
    s = {m: sizes(m) for m in MODELS}
    lines = ["| step: what is held | LLaVA-1.5-7B | LLaVA-1.5-13B |", "|---|---:|---:|"]
    for label, key in ROWS:
        if key is None:
            cells = [f"{s[m]['params']:,} / {s[m]['linear']:,}" for m in MODELS]
        else:
            cells = [_gb(s[m][key]) for m in MODELS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(table())

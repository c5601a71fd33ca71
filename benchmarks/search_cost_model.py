"""What a search costs against one uniform SparseGPT prune, counted in FLOPs from a recipe.

    .venv/bin/python benchmarks/search_cost_model.py --config configs/llava-1.5-7b.yaml
    .venv/bin/python benchmarks/search_cost_model.py --config configs/toy.yaml --result DIR/result.json
    .venv/bin/python benchmarks/search_cost_model.py --config configs/llava-1.5-7b.yaml \
        --set selection=staged --set proxy_multimodal=/data/llava-mm.jsonl

The count follows what `ellava search` runs (app/search.py), phase by phase; one multiply-add
is 2 FLOPs, elementwise work is left out (eval/flops.py):

  forward       decoder prefill of the proxy parts (eval/flops.py per layer, as padded in their
                length groups) plus the LM head, 2 * H * V per position
  Hessians      2 * positions * d^2 per input group and layer (q/k/v share one, gate/up one)
  OBS           per matrix (n inputs, o outputs, block B = 128): Cholesky n^3 / 3, updates
                o * n^2 + o * n * B per level (bench_obs.py); the database's levels share the
                Cholesky
  uniform prune calibration forward + Hessians + OBS at one level
  database      dense calibration forward + Hessians + OBS at every level
  fitness       rounds x population candidates x the forward of every part (an upper bound:
                repeated policies run once, text parts once per policy), then the archived top
                candidates re-scored on the multimodal parts (text parts: cached);
                staged selection: per round, each stage's candidates x the forward of that
                stage's slice (share x the samples of each kind), then the winner's pick: the
                candidates that reached the last stage (at most rounds x its survivors)
                re-scored on its multimodal slice
  projector     rounds x steps x trained candidates x (forward + backward) of the multimodal
                parts (`projector_samples` of them per step when set); backward ~ forward
                (no weight gradients), so 2x forward
  final         the re-prune: the same count as the uniform prune

With `--result`, the measured ratio of that run (compilation taken out) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

BLOCK = 128


def _group_dims(t) -> dict[str, int]:
    return {
        "attn_in": t.hidden_size,
        "o_in": t.num_attention_heads * t.head_dim,
        "mlp_in": t.hidden_size,
        "down_in": t.intermediate_size,
    }


def _matrix_shapes(t) -> list[tuple[int, int]]:
    """(inputs, outputs) of a layer's seven linears."""
    h, i, q = t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def forward_flops(config, shapes, head: bool = True) -> float:
    """Decoder (+ LM head) prefill of parts given as (rows, padded length)."""
    from ellava_jax.eval.flops import layer_prefill_flops

    t = config.text
    total = 0.0
    for rows, length in shapes:
        per_row = t.num_hidden_layers * sum(layer_prefill_flops(t, length).values())
        if head:
            per_row += 2 * length * t.hidden_size * t.vocab_size
        total += rows * per_row
    return total


def hessian_flops(config, positions: int) -> float:
    t = config.text
    return t.num_hidden_layers * sum(2.0 * positions * d * d for d in _group_dims(t).values())


def obs_flops(config, levels: int) -> float:
    t = config.text
    per_layer = sum(n**3 / 3 + levels * (o * n * n + o * n * BLOCK) for n, o in _matrix_shapes(t))
    return t.num_hidden_layers * per_layer


def recipe_shapes(settings, config) -> tuple[list, list]:
    """Proxy parts from the recipe's sizes: text segments; multimodal samples (one image and a
    quarter segment of text each) only when the recipe names a multimodal file."""
    text = [(settings.proxy_segments, settings.proxy_seq_len)]
    mm = []
    if settings.proxy_multimodal:
        n = config.num_image_tokens + settings.proxy_seq_len // 4
        mm = [(settings.proxy_multimodal_samples, n)]
    return text, mm


def proxy_shapes(settings, config, model_dir) -> tuple[list, list]:
    """(text parts, multimodal parts) as (rows, padded length), as the search groups them."""
    from ellava_jax.app.sources import search_proxy
    from ellava_jax.search.proxy_sources import length_buckets

    proxy = search_proxy(settings, config, model_dir)

    def parts(mask):
        lengths = np.asarray(mask).sum(1)
        return [(len(g), int(lengths[g].max())) for g in length_buckets(lengths)]

    return parts(proxy.text_mask), parts(proxy.mm_mask) if len(proxy.mm_mask) else []


def _share(parts, share: float) -> list:
    """A stage's slice of (rows, length) parts: ceil(share x all rows) of them, the parts'
    rows in proportion (the slice is drawn at random: an expectation, not a count)."""
    total = sum(r for r, _ in parts)
    keep = math.ceil(share * total)
    return [(r * keep / total, n) for r, n in parts] if total else []


def cost_model(settings, config, text, mm, trained: int) -> dict[str, float]:
    calib = text + mm
    positions = sum(r * n for r, n in calib)
    prune_forward = forward_flops(config, calib, head=False)
    uniform = prune_forward + hessian_flops(config, positions) + obs_flops(config, 1)
    database = prune_forward + hessian_flops(config, positions) + obs_flops(config, 5)
    stages = settings.stages()
    fitness = settings.rounds * sum(
        n * (forward_flops(config, _share(text, f)) + forward_flops(config, _share(mm, f)))
        for f, n in stages
    )
    last_share, last_count = stages[-1]
    if len(stages) == 1:  # the archive's top candidates re-scored on the multimodal parts
        fitness += settings.rounds * settings.top_k * forward_flops(config, mm)
    else:  # those that reached the last stage, on its multimodal slice
        fitness += settings.rounds * last_count * forward_flops(config, _share(mm, last_share))
    steps = settings.projector_steps if mm else 0
    per_step = mm
    if settings.projector_samples is not None and mm:
        rows = sum(r for r, _ in mm)
        per_step = [(min(settings.projector_samples, rows), max(n for _, n in mm))]
    projector = settings.rounds * steps * trained * 2 * forward_flops(config, per_step)
    return {
        "uniform prune": uniform,
        "database": database,
        "fitness": fitness,
        "projector training": projector,
        "final re-prune": uniform,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a search recipe (configs/*.yaml)")
    ap.add_argument(
        "--preset", default="llava-1.5-7b", help="model config when the recipe's model is absent"
    )
    ap.add_argument(
        "--trained", type=int, default=4, help="candidates the projector trains on per round"
    )
    ap.add_argument("--result", help="a search's result.json: print its measured ratio beside")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, as `ellava search --set` (e.g. selection=staged)",
    )
    args = ap.parse_args(argv)

    from ellava_jax.app.models import load_model
    from ellava_jax.config import LlavaConfig, get_preset
    from ellava_jax.search.settings import command_line_overrides, load_settings

    overrides, origins = command_line_overrides(args.set, {})
    s = load_settings(args.config, overrides, origins=origins)
    if s.model in ("toy", "tiny", "smollm2"):  # models this install has: their own proxy
        config, _, model_dir = load_model(s.model)
        text, mm = proxy_shapes(s, config, model_dir)
        source, where = s.model, "the proxy data"
    else:
        hf = os.path.join(s.model, "config.json")
        here = os.path.isfile(hf)
        config = LlavaConfig.from_hf_config(hf) if here else get_preset(args.preset)
        source = s.model if here else f"preset {args.preset} ({s.model} is not here)"
        text, mm = recipe_shapes(s, config)
        where = "the recipe's sizes"
    phases = cost_model(s, config, text, mm, args.trained)
    uniform = phases.pop("uniform prune")
    search = sum(phases.values())
    print(
        f"model: {source}; {config.text.num_hidden_layers} layers, hidden {config.text.hidden_size}"
    )
    print(f"proxy parts from {where}: text {text}, multimodal {mm} (rows, padded length)")
    per_step = "all" if s.projector_samples is None else s.projector_samples
    print(
        f"recipe: {s.rounds} rounds x {s.population} candidates, {s.projector_steps} projector "
        f"steps on {args.trained} candidates ({per_step} multimodal samples per step)"
    )
    stages = ", then ".join(f"{n} on {f:g}" for f, n in s.stages())
    print(f"selection: {s.selection} (candidates on a share of the proxy: {stages})\n")
    print(f"{'phase':<20} {'TFLOP':>12} {'share':>7} {'x uniform prune':>16}")
    for name, f in phases.items():
        print(f"{name:<20} {f / 1e12:12.2f} {f / search:7.1%} {f / uniform:16.1f}")
    print(f"{'search, all phases':<20} {search / 1e12:12.2f} {1:7.0%} {search / uniform:16.1f}")
    print(f"{'uniform prune':<20} {uniform / 1e12:12.2f}")
    if args.result:
        with open(args.result) as f:
            r = json.load(f)
        print(
            f"\nmeasured ({args.result}): {r.get('cost_ratio_excluding_compile', float('nan')):.1f}x "
            f"without compilation, {r['cost_ratio_vs_uniform_prune']:.1f}x as run"
        )
    return 0


if __name__ == "__main__":
    from ellava_jax.errors import run_script

    run_script(main)  # a bad recipe or --set: its one line, exit code 2

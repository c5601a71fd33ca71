"""Trains the embedded toy LLaVA and ships it in HF format.

    PYTHONPATH=. .venv/bin/python scripts/train_toy.py [--out ellava_jax/assets/toy] [--steps N]

Builds the toy tokenizer, trains the toy LLaVA on the synthetic task (ellava_jax.toy.train),
writes config.json, model.safetensors, the tokenizer files and preprocessor_config.json to --out,
then scores the test split dense and after 70% uniform magnitude pruning of the decoder linears
and writes those figures to <out>/train_report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from convert.hf import load_hf_llava, save_hf_llava
from ellava_jax.toy import questions, scenes
from ellava_jax.toy import tokenizer as toy_tokenizer
from ellava_jax.toy import train as toy


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ellava_jax/assets/toy")
    for f in dataclasses.fields(toy.TrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=344)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=None, help="score only the first N test items")
    ap.add_argument("--probe-every", type=int, default=0, help="validation score every N steps")
    args = ap.parse_args(argv)
    tc = toy.TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(toy.TrainConfig)}
    )

    t0 = time.time()
    tok = toy_tokenizer.build_toy_tokenizer()
    config = toy_config = toy.toy_config(
        tok.get_vocab_size(), args.hidden, args.layers, args.mlp, args.heads, args.kv_heads
    )
    print(f"vocab {tok.get_vocab_size()}, {tc}", flush=True)
    val = [r for r, _ in questions.generate_split("validation", 300)]

    def probe(step, params):
        print(f"  validation at {step}: {toy.score(config, params, tok, val)}", flush=True)

    params = toy.train(config, tok, tc, lambda s: print(s, flush=True), probe, args.probe_every)
    train_s = time.time() - t0

    save_hf_llava(args.out, config, params)
    toy_tokenizer.save_tokenizer(tok, args.out)
    with open(os.path.join(args.out, "preprocessor_config.json"), "w") as f:
        json.dump(scenes.image_processor_config(), f, indent=2)
    config, params = load_hf_llava(args.out)  # score what was shipped
    assert config == toy_config

    test = [r for r, _ in questions.generate_split("test", args.n_test)]
    dense = toy.score(config, params, tok, test)
    pruned = toy.score(config, toy.magnitude_prune(params, 0.7), tok, test)
    report = {
        "train_seconds": round(train_s, 1),
        "train_config": dataclasses.asdict(tc),
        "dense": dense,
        "magnitude_0.7": pruned,
        "drop_points": round(100 * (dense["accuracy"] - pruned["accuracy"]), 2),
    }
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

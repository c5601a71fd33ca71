"""The projector step's cheaper forms against today's, by the loss they reach, round by round.

Today's step trains the projector for `projector_steps` Adam steps on every multimodal sample;
a cheaper form takes fewer steps on a minibatch of `projector_samples` samples each (the same
objective, sum_m c_m L_m; only the optimisation is shortened). On the toy this trains one
projector per form for several rounds on the same top candidates (the round-1 top-k of a
random population: what a search's first round hands the step), each form continuing from its
own projector as a search does, and prints after every round the objective on all the
multimodal samples, the same for every form, with each form's FLOPs per round (forward +
backward sample passes) and wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/projector_step.py [--rounds 10] \\
        [--forms 20x32 4x8 8x4 2x16] [--seed 0]

A form is STEPSxSAMPLES[@LR]; 20x32 is today's (the toy recipe: 20 steps on all 32 samples at
its projector_lr). Adam moves each weight by about LR per step wherever the gradient is
nonzero, so fewer steps at the same LR move the projector proportionally less; @LR sets a
form's own rate (1e-4 is the toy recipe's). `--mass` is the recipe's projector_mass: the
candidates holding that share of c_m are trained, as in the search.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/toy.yaml")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--forms", nargs="+", default=["20x32", "4x8", "4x8@5e-4", "8x4@2.5e-4"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from ellava_jax.app.models import load_model
    from ellava_jax.app.sources import search_proxy
    from ellava_jax.prune.database import build_database
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.search.fitness import fitness, layer_entries
    from ellava_jax.search.policy import PolicySpace
    from ellava_jax.search.projector import _weighted_loss, importance_weights, train_projector
    from ellava_jax.search.proxy_batches import FitnessBatches
    from ellava_jax.search.settings import load_settings

    def parse(form: str):
        shape, _, lr = form.partition("@")
        steps, samples = (int(x) for x in shape.split("x"))
        return form, steps, samples, float(lr) if lr else None

    forms = [parse(f) for f in args.forms]
    s = load_settings(args.config, seed=args.seed)
    config, params, model_dir = load_model(s.model)
    proxy = search_proxy(s, config, model_dir)
    calib = build_calibration_set(config, params, proxy.calibration_batches(), s.calib_batch_size)
    space = PolicySpace(config, s.p0, s.granularity, s.step, s.width, s.tol)
    db = build_database(config, params, calib, space.levels, progress=False)
    fb = FitnessBatches(config, params, proxy, s.replace(projector_samples=1))
    n_mm = fb.n_mm
    idx = space.random(s.population, np.random.default_rng(args.seed))
    j = np.asarray(
        fitness(config, params, db, space, idx, fb.parts(params["multi_modal_projector"]), s.eta)[0]
    )
    top = idx[np.argsort(j, kind="stable")[: s.top_k]]
    c = importance_weights(top, s.neighbors, s.weighting)
    stacks = db.device_stacks()
    lv = jnp.asarray(top[:, layer_entries(space)])

    def objective(proj) -> float:
        """sum_m c_m L_m on every multimodal sample (every form is judged on the same)."""
        loss, _ = _weighted_loss(
            proj, config, params, stacks, lv, jnp.asarray(c, jnp.float32), fb.training, (None, None)
        )
        return float(loss)

    start = objective(params["multi_modal_projector"])
    print(
        f"{s.model}: {n_mm} multimodal samples, top {s.top_k} of {s.population} random "
        f"candidates, c_m {np.round(c, 3).tolist()}; objective with the dense projector {start:.5f}"
    )
    out = {"start": start, "forms": {}}
    for form, steps, samples, lr in forms:
        lr = s.projector_lr if lr is None else lr
        proj, per_round, seconds = params["multi_modal_projector"], [], 0.0
        for r in range(args.rounds):
            p = dict(params, multi_modal_projector=proj)
            t0 = time.perf_counter()
            if samples >= n_mm:  # today's form: every sample, every step
                proj, _ = train_projector(
                    config,
                    p,
                    db,
                    space,
                    top,
                    c,
                    fb.training,
                    steps=steps,
                    lr=lr,
                    mass=s.projector_mass,
                )
            else:
                batches = fb.training_samples(samples, args.seed, r, steps)
                proj, _ = train_projector(
                    config,
                    p,
                    db,
                    space,
                    top,
                    c,
                    None,
                    steps=0,
                    lr=lr,
                    mass=s.projector_mass,
                    step_batches=batches,
                )
            jax.block_until_ready(proj)
            seconds += time.perf_counter() - t0
            per_round.append(objective(proj))
        name = form
        out["forms"][name] = {
            "lr": lr,
            "steps": steps,
            "samples": min(samples, n_mm),
            "sample_passes_per_round": steps * min(samples, n_mm),
            "objective_per_round": per_round,
            "train_seconds": seconds,
        }
        print(f"{name}: objective after each round " + " ".join(f"{x:.5f}" for x in per_round))
    names = list(out["forms"])
    print("\n| round | " + " | ".join(f"{n} (steps x samples @ lr)" for n in names) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " |")
    for r in range(args.rounds):
        print(
            f"| {r + 1} | "
            + " | ".join(f"{out['forms'][n]['objective_per_round'][r]:.5f}" for n in names)
            + " |"
        )
    print(
        "| sample passes per round (x trained candidates x fwd+bwd) | "
        + " | ".join(str(out["forms"][n]["sample_passes_per_round"]) for n in names)
        + " |"
    )
    print(
        "| training wall s, all rounds (2 CPU cores) | "
        + " | ".join(f"{out['forms'][n]['train_seconds']:.1f}" for n in names)
        + " |"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    from ellava_jax.errors import run_script

    run_script(main)  # a bad recipe or --set: its one line, exit code 2

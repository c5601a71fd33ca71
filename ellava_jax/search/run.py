"""`ellava search` end to end: database, evolution, final re-prune, evaluation, outputs.

Outputs in the run directory:
  result.json      policy, mean sparsity, accuracy (dense / uniform / searched), OBS call
                   counts, timings, settings
  rounds.jsonl     per-round log: best and mean fitness, c_m, projector loss
  model/           the searched, pruned model with the evolved projector (HF format)
  uniform/         uniform SparseGPT at p0 (HF format), the baseline
  checkpoint/      the searched model's params (orbax); checkpoints/ the per-round state
  projector/       the evolved projector (orbax)
  masks.npz        the searched model's masks
  fitness.png      best and mean fitness per round; policy.png the per-layer sparsities;
  accuracy.png     accuracy by category of dense / uniform / searched (when evaluated)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax import ckpt
from ellava_jax.model.llava import embed_text, vision_features
from ellava_jax.prune.database import build_database
from ellava_jax.prune.hessian import build_calibration_set, left_pad
from ellava_jax.prune.masks import masks_from_params, save_masks, sparsity_summary
from ellava_jax.prune.pipeline import prune_model
from ellava_jax.search.evolve import evolve
from ellava_jax.search.fitness import (
    ProxyBatch,
    dense_log_probs,
    fitness,
    next_token_targets,
)
from ellava_jax.search.policy import PolicySpace
from ellava_jax.search.projector import MultimodalProxy, train_projector
from ellava_jax.search.proxy_sources import ProxyData, load_proxy

log = logging.getLogger(__name__)


class FitnessBatches:
    """The fitness's proxy batch (text segments + multimodal samples) for a given projector."""

    def __init__(self, config, params, proxy: ProxyData, settings):
        self.config = config
        t = max(proxy.text_ids.shape[1], proxy.mm_ids.shape[1] if len(proxy.mm_ids) else 0)
        self.t = t
        self.text_ids = left_pad(proxy.text_ids, t)
        self.text_mask = left_pad(proxy.text_mask, t)
        self.has_mm = len(proxy.mm_ids) > 0
        emb = jax.jit(embed_text, static_argnums=0)
        self.text_embeds = emb(config, params, jnp.asarray(self.text_ids))
        if self.has_mm:
            ids, mask = left_pad(proxy.mm_ids, t), left_pad(proxy.mm_mask, t)
            vf = jax.jit(vision_features, static_argnums=0)(
                config, params, jnp.asarray(proxy.mm_pixels)
            )
            labels, lmask = next_token_targets(config, ids, mask)
            self.mm = MultimodalProxy(
                jnp.asarray(ids),
                jnp.asarray(mask),
                emb(config, params, jnp.asarray(ids)),
                vf,
                labels,
                lmask,
                None,
            )
        self.fitness_kl = settings.fitness_loss == "kl"
        self.dense_logp = None
        if self.fitness_kl:
            self.dense_logp = dense_log_probs(
                config, params, self.batch(params["multi_modal_projector"])
            )
        if self.has_mm and settings.projector_loss == "kl":
            dense_mm = self.mm.batch(config, params["multi_modal_projector"])
            self.mm = self.mm.replace(dense_logp=dense_log_probs(config, params, dense_mm))

    def batch(self, projector) -> ProxyBatch:
        labels, lmask = next_token_targets(self.config, self.text_ids, self.text_mask)
        b = ProxyBatch(self.text_embeds, jnp.asarray(self.text_mask), labels, lmask)
        if not self.has_mm:
            return b
        m = self.mm.batch(self.config, projector)
        return ProxyBatch(
            jnp.concatenate([b.inputs_embeds, m.inputs_embeds.astype(b.inputs_embeds.dtype)]),
            jnp.concatenate([b.attention_mask, m.attention_mask]),
            jnp.concatenate([b.labels, m.labels]),
            jnp.concatenate([b.label_mask, m.label_mask]),
        )


def run_search(
    settings, out_dir: str, *, evaluate=None, stop_after_round=None, progress=True, say=print
) -> dict:
    """Runs the search described by `settings` into `out_dir` (resuming if it holds checkpoints).

    Args:
      evaluate: `evaluate(config, params) -> {"accuracy": ..., ...}` or None (no accuracy).
      stop_after_round: simulate a kill after this round (tests).
    """
    from convert.hf import save_hf_llava
    from ellava_jax.models import load_model

    os.makedirs(out_dir, exist_ok=True)
    t_all = time.perf_counter()
    config, params, model_dir = load_model(settings.model)
    space = PolicySpace(
        config, settings.p0, settings.granularity, settings.step, settings.width, settings.tol
    )
    proxy = load_proxy(settings, config, model_dir)
    calib = build_calibration_set(
        config, params, proxy.calibration_batches(), settings.calib_batch_size
    )
    say(
        f"search: {config.text.num_hidden_layers} decoder layers, {space.n_entries} policy entries, "
        f"levels {space.levels.tolist()}, {calib.n_samples} proxy samples"
    )

    timings = {}
    searched = settings.rounds > 0
    db_calls = final_calls = 0
    if searched:
        t0 = time.perf_counter()
        db = build_database(
            config,
            params,
            calib,
            space.levels,
            where=settings.database_storage,
            batch_size=settings.calib_batch_size,
            progress=progress,
        )
        timings["database_s"] = time.perf_counter() - t0
        db_calls = db.pruner_calls
        say(
            f"level database: {db.pruner_calls} OBS calls ({space.n_levels} levels x "
            f"{len(db.kernels)} matrices) in {db.seconds:.1f} s"
        )
        fb = FitnessBatches(config, params, proxy, settings)

        def score(projector, idx):
            p = dict(params, multi_modal_projector=projector)
            return fitness(
                config,
                p,
                db,
                space,
                idx,
                fb.batch(projector),
                settings.eta,
                fb.dense_logp,
                streaming=settings.streaming,
            )

        def train(projector, top_idx, c):
            if not fb.has_mm or settings.projector_steps <= 0:
                return projector, np.zeros(0)
            p = dict(params, multi_modal_projector=projector)
            return train_projector(
                config,
                p,
                db,
                space,
                top_idx,
                c,
                fb.mm,
                steps=settings.projector_steps,
                lr=settings.projector_lr,
                mass=settings.projector_mass,
            )

        def show(r):
            say(
                f"round {r.round + 1}/{settings.rounds}: best J {r.best_fitness:.4f} (L {r.best_loss:.4f}, "
                f"G {r.best_g:.3f}), mean J {r.mean_fitness:.4f}, mean sparsity {r.best_mean_sparsity:.3f}, "
                f"{r.seconds:.1f} s"
            )

        t0 = time.perf_counter()
        checkpoints = ckpt.RoundCheckpoints(os.path.join(out_dir, "checkpoints"))
        try:
            res = evolve(
                settings,
                config,
                params,
                db,
                space,
                score,
                train,
                checkpoints,
                stop_after_round=stop_after_round,
                on_round=show,
            )
        finally:
            checkpoints.close()
        timings["search_s"] = time.perf_counter() - t0
        best_idx, projector = res.best_idx, res.projector
        with open(os.path.join(out_dir, "rounds.jsonl"), "w") as f:
            for r in res.rounds:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        del db
    else:
        best_idx, projector, res = space.uniform(), params["multi_modal_projector"], None

    # Final: sequential SparseGPT with the winning policy and the evolved projector.
    t0 = time.perf_counter()
    final_params = dict(params, multi_modal_projector=projector)
    final_calib = build_calibration_set(
        config, final_params, proxy.calibration_batches(), settings.calib_batch_size
    )
    pruned, stats = prune_model(
        config,
        final_params,
        space.per_matrix(best_idx),
        "sparsegpt",
        final_calib,
        batch_size=settings.calib_batch_size,
        progress=progress,
    )
    final_calls = stats.pruner_calls
    timings["final_prune_s"] = time.perf_counter() - t0
    say(f"final sequential re-prune: {stats.pruner_calls} OBS calls in {stats.seconds:.1f} s")

    # Baseline: uniform SparseGPT at p0, the original projector (one sequential prune).
    t0 = time.perf_counter()
    uniform, ustats = prune_model(
        config,
        params,
        space.per_matrix(space.uniform()),
        "sparsegpt",
        calib,
        batch_size=settings.calib_batch_size,
        progress=progress,
    )
    timings["uniform_prune_s"] = time.perf_counter() - t0

    save_hf_llava(os.path.join(out_dir, "model"), config, pruned, copy_from=model_dir)
    save_hf_llava(os.path.join(out_dir, "uniform"), config, uniform, copy_from=model_dir)
    ckpt.save_tree(os.path.join(out_dir, "checkpoint"), pruned)
    ckpt.save_tree(os.path.join(out_dir, "projector"), projector)
    save_masks(os.path.join(out_dir, "masks.npz"), masks_from_params(config, pruned))

    accuracy = None
    if evaluate is not None:
        accuracy = {
            "dense": evaluate(config, params),
            "uniform": evaluate(config, uniform),
            "searched": evaluate(config, pruned),
        }
    summary = sparsity_summary(config, pruned)
    result = {
        "policy": space.as_policy(best_idx),
        "policy_levels": [int(x) for x in best_idx],
        "mean_sparsity": float(space.mean_sparsity(best_idx)),
        "measured_sparsity": summary["overall"],
        "uniform_measured_sparsity": sparsity_summary(config, uniform)["overall"],
        "accuracy": accuracy,
        "obs_calls": {
            "database": db_calls,
            "final_reprune": final_calls,
            "search_total": db_calls + final_calls,
            "uniform_baseline": ustats.pruner_calls,
        },
        "candidates_evaluated": None if res is None else res.evaluated,
        "best_fitness": None if res is None else res.best_fitness,
        "timings_s": timings | {"total_s": time.perf_counter() - t_all},
        "cost_ratio_vs_uniform_prune": (
            timings.get("database_s", 0) + timings.get("search_s", 0) + timings["final_prune_s"]
        )
        / max(timings["uniform_prune_s"], 1e-9),
        "settings": dataclasses.asdict(settings),
        "model": model_dir or settings.model,
    }
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    _plots(out_dir, result, res, settings)
    return result


def _plots(out_dir: str, result: dict, res, settings) -> None:
    """fitness.png, policy.png and accuracy.png beside result.json."""
    from ellava_jax.report import plots

    if res is not None and res.rounds:
        plots.fitness_over_rounds(
            [dataclasses.asdict(r) for r in res.rounds],
            os.path.join(out_dir, "fitness.png"),
            title=f"search at p0 = {settings.p0:g}",
        )
    plots.policy_bars(result["policy"], settings.p0, os.path.join(out_dir, "policy.png"))
    if result["accuracy"]:
        plots.accuracy_by_category(
            result["accuracy"],
            os.path.join(out_dir, "accuracy.png"),
            title=f"toy test split, p0 = {settings.p0:g}",
        )

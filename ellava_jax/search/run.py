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

import contextlib
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
from ellava_jax.outputs import atomic_file, read_marker, write_marker
from ellava_jax.prune.database import build_database
from ellava_jax.prune.hessian import build_calibration_set
from ellava_jax.prune.masks import masks_from_params, save_masks, sparsity_summary
from ellava_jax.prune.pipeline import prune_model
from ellava_jax.search import resume
from ellava_jax.search.evolve import evolve
from ellava_jax.search.fitness import (
    ProxyBatch,
    dense_log_probs,
    fitness,
    next_token_targets,
)
from ellava_jax.search.policy import PolicySpace
from ellava_jax.search.projector import MultimodalProxy, train_projector
from ellava_jax.search.proxy_sources import ProxyData, length_buckets, load_proxy

log = logging.getLogger(__name__)


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class PhaseClock:
    """Wall seconds of each phase of a run, and the part of them JAX spent compiling (tracing,
    lowering, XLA compilation: the union of those intervals, so nested traces count once).

        clock = PhaseClock()
        with clock("database"):
            ...
        clock.seconds() -> {"database_s": 12.1, "database_compile_s": 3.4}
    """

    def __init__(self):
        self.wall: dict[str, float] = {}
        self._spans: dict[str, list[tuple[float, float]]] = {}
        self._current: str | None = None

    def _listen(self, event: str, duration: float, **_):
        if self._current is not None and event in _COMPILE_EVENTS:
            end = time.perf_counter()
            self._spans[self._current].append((end - duration, end))

    def compile_seconds(self, name: str) -> float:
        total, reach = 0.0, -np.inf
        for a, b in sorted(self._spans.get(name, [])):
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._current, self._spans[name] = name, []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - t0
            jax.monitoring.unregister_event_duration_listener(self._listen)
            self._current = None

    def seconds(self) -> dict[str, float]:
        out = {}
        for name, wall in self.wall.items():
            out[f"{name}_s"] = wall
            out[f"{name}_compile_s"] = self.compile_seconds(name)
        return out


class FitnessBatches:
    """The proxy samples as the fitness and the projector training read them.

    Text segments and multimodal samples are grouped by length (`length_buckets`), each group
    padded only to its own longest row. The text groups are `fixed` parts: no image tokens, so
    their loss depends on the policy alone, and `cache` keeps it per policy for the whole search.
    """

    def __init__(
        self, config, params, proxy: ProxyData, settings, max_buckets: int = 4, min_rows: int = 8
    ):
        self.config = config
        self.fitness_kl = settings.fitness_loss == "kl"
        self.projector_kl = settings.projector_loss == "kl"
        self.cache: dict = {}
        emb = jax.jit(embed_text, static_argnums=0)

        def rows_of(ids, mask, rows):
            """The rows, trimmed to their longest: the proxy is left-padded."""
            m = np.asarray(mask)[rows]
            lens, t = m.sum(1), m.shape[1]
            if ((m > 0) != (np.arange(t)[None] >= t - lens[:, None])).any():
                raise ValueError("proxy samples must be left-padded (real tokens last)")
            n = int(lens.max())
            return np.asarray(ids)[rows][:, -n:], m[:, -n:]

        self.text: list[ProxyBatch] = []
        for rows in length_buckets(np.asarray(proxy.text_mask).sum(1), max_buckets, min_rows):
            ids, mask = rows_of(proxy.text_ids, proxy.text_mask, rows)
            labels, lmask = next_token_targets(config, ids, mask)
            part = ProxyBatch(
                emb(config, params, jnp.asarray(ids)), jnp.asarray(mask), labels, lmask, fixed=True
            )
            if self.fitness_kl:
                part = part.replace(dense_logp=dense_log_probs(config, params, part))
            self.text.append(part)

        self.mm: list[MultimodalProxy] = []
        if len(proxy.mm_ids):
            vf = jax.jit(vision_features, static_argnums=0)(
                config, params, jnp.asarray(proxy.mm_pixels)
            )
            per_row = (np.asarray(proxy.mm_ids) == config.image_token_index).sum(1)
            n_img, extra = np.divmod(per_row, config.num_image_tokens)  # images per sample
            if extra.any():
                raise ValueError(
                    f"multimodal proxy sample {int(np.argmax(extra > 0))} holds {per_row[extra > 0][0]}"
                    f" image tokens, not a multiple of {config.num_image_tokens} per image"
                )
            first = np.concatenate([[0], np.cumsum(n_img)[:-1]])
            for rows in length_buckets(np.asarray(proxy.mm_mask).sum(1), max_buckets, min_rows):
                ids, mask = rows_of(proxy.mm_ids, proxy.mm_mask, rows)
                images = np.concatenate([np.arange(first[r], first[r] + n_img[r]) for r in rows])
                labels, lmask = next_token_targets(config, ids, mask)
                self.mm.append(
                    MultimodalProxy(
                        jnp.asarray(ids),
                        jnp.asarray(mask),
                        emb(config, params, jnp.asarray(ids)),
                        vf[jnp.asarray(images, jnp.int32)],
                        labels,
                        lmask,
                        None,
                    )
                )
            if self.fitness_kl or self.projector_kl:  # both compare with the dense projector's
                dense = params["multi_modal_projector"]
                self.mm = [
                    m.replace(dense_logp=dense_log_probs(config, params, m.batch(config, dense)))
                    for m in self.mm
                ]
        self.has_mm = bool(self.mm)

    def parts(self, projector) -> list[ProxyBatch]:
        """The fitness's proxy parts for a given projector: text groups, then multimodal ones."""
        mm = [m.batch(self.config, projector) for m in self.mm]
        if not self.fitness_kl:
            mm = [b.replace(dense_logp=None) for b in mm]
        return self.text + mm

    @property
    def training(self) -> list[MultimodalProxy]:
        """The multimodal groups the projector trains on (with the KL target when it uses KL)."""
        return self.mm if self.projector_kl else [m.replace(dense_logp=None) for m in self.mm]


def run_search(
    settings,
    out_dir: str,
    *,
    evaluate=None,
    stop_after_round=None,
    progress=True,
    say=print,
    fresh: bool = False,
) -> dict:
    """Runs the search described by `settings` into `out_dir`, resuming a run of the same
    settings (see `search/resume.py`); a finished one returns its result unchanged.

    Args:
      evaluate: `evaluate(config, params) -> {"accuracy": ..., ...}` or None (no accuracy).
      stop_after_round: simulate a kill after this round (tests).
      fresh: start afresh, removing what `out_dir` holds (`--overwrite`).
    """
    if fresh and os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        os.remove(out_dir)  # --overwrite of a file
    os.makedirs(out_dir, exist_ok=True)
    with resume.RunLock(out_dir):
        if fresh:
            resume.clear(out_dir)
        if read_marker(out_dir) is None:
            write_marker(out_dir, "search")
        finished = resume.open_run(out_dir, settings, say)
        if finished is not None:
            return finished
        return _run_search(settings, out_dir, evaluate, stop_after_round, progress, say)


def _run_search(settings, out_dir, evaluate, stop_after_round, progress, say) -> dict:
    from convert.hf import save_hf_llava
    from ellava_jax.models import load_model

    t_all = time.perf_counter()
    config, params, model_dir = load_model(settings.model)
    space = PolicySpace(
        config, settings.p0, settings.granularity, settings.step, settings.width, settings.tol
    )
    searched = settings.rounds > 0
    resume_point = checkpoints = None
    if searched:  # read before the expensive work: a corrupt round falls back to the one before
        checkpoints = ckpt.RoundCheckpoints(os.path.join(out_dir, resume.CHECKPOINTS))
        resume_point = checkpoints.latest_intact(say)
    proxy = load_proxy(settings, config, model_dir)
    calib = build_calibration_set(
        config, params, proxy.calibration_batches(), settings.calib_batch_size
    )
    say(
        f"search: {config.text.num_hidden_layers} decoder layers, {space.n_entries} policy entries, "
        f"levels {space.levels.tolist()}, {calib.n_samples} proxy samples"
    )

    clock = PhaseClock()
    db_calls = final_calls = 0
    if searched:
        with clock("database"):
            db = build_database(
                config,
                params,
                calib,
                space.levels,
                where=settings.database_storage,
                batch_size=settings.calib_batch_size,
                progress=progress,
            )
        db_calls = db.pruner_calls
        say(
            f"level database: {db.pruner_calls} OBS calls ({space.n_levels} levels x "
            f"{len(db.kernels)} matrices) in {db.seconds:.1f} s"
        )
        with clock("search"):  # the proxy parts, every round, the winner's re-scoring
            fb = FitnessBatches(config, params, proxy, settings)

            def score(projector, idx):
                p = dict(params, multi_modal_projector=projector)
                return fitness(
                    config,
                    p,
                    db,
                    space,
                    idx,
                    fb.parts(projector),
                    settings.eta,
                    cache=fb.cache,
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
                    fb.training,
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
                    resume=resume_point,
                    stop_after_round=stop_after_round,
                    on_round=show,
                )
            finally:
                checkpoints.close()
        best_idx, projector = res.best_idx, res.projector
        with atomic_file(os.path.join(out_dir, "rounds.jsonl")) as f:
            for r in res.rounds:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        del db
    else:
        best_idx, projector, res = space.uniform(), params["multi_modal_projector"], None

    # Final: sequential SparseGPT with the winning policy and the evolved projector.
    with clock("final_prune"):
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
    say(f"final sequential re-prune: {stats.pruner_calls} OBS calls in {stats.seconds:.1f} s")

    # Baseline: uniform SparseGPT at p0, the original projector (one sequential prune).
    # It reuses what the final re-prune compiled: compare with `cost_ratio_excluding_compile`.
    with clock("uniform_prune"):
        uniform, ustats = prune_model(
            config,
            params,
            space.per_matrix(space.uniform()),
            "sparsegpt",
            calib,
            batch_size=settings.calib_batch_size,
            progress=progress,
        )

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
    timings = clock.seconds()
    phases = [p for p in ("database", "search", "final_prune") if p in clock.wall]
    search_cost = sum(timings[f"{p}_s"] for p in phases)
    search_work = search_cost - sum(timings[f"{p}_compile_s"] for p in phases)
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
        "cost_ratio_vs_uniform_prune": search_cost / max(timings["uniform_prune_s"], 1e-9),
        "cost_ratio_excluding_compile": search_work
        / max(timings["uniform_prune_s"] - timings["uniform_prune_compile_s"], 1e-9),
        "settings": dataclasses.asdict(settings),
        "model": model_dir or settings.model,
    }
    with atomic_file(os.path.join(out_dir, resume.RESULT_FILE)) as f:
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

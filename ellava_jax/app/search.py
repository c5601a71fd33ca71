"""`ellava search` end to end: database, evolution, final re-prune, evaluation, outputs.

Outputs in the run directory:
  result.json      policy, mean sparsity, accuracy (dense / uniform / searched), OBS call
                   counts, timings, settings
  rounds.jsonl     per-round log: best and mean fitness, c_m, projector loss
  model/           the searched, pruned model with the evolved projector (HF format)
  uniform/         uniform SparseGPT at p0 (HF format), the baseline
  checkpoint/      the searched model's params (orbax); checkpoints/ the per-round state
  projector/       the evolved projector (orbax; not written for a text-only LLaMA, which has
                   none: its search scores the text proxy alone, no projector step)
  masks.npz        the searched model's masks
  fitness.png      best and mean fitness per round; policy.png the per-layer sparsities;
  accuracy.png     accuracy by category of dense / uniform / searched (when evaluated)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time

import jax
import numpy as np

from convert.hf import save_hf_llava
from ellava_jax import ckpt, distributed
from ellava_jax.app import resume
from ellava_jax.app.clock import PhaseClock
from ellava_jax.app.models import load_model
from ellava_jax.app.sources import search_proxy
from ellava_jax.mesh import (
    local_devices,
    make_mesh,
    mesh_notes,
    shard_kernels,
    shard_params,
    to_host,
)
from ellava_jax.outputs import atomic_file, read_marker, write_marker
from ellava_jax.prune.database import build_database
from ellava_jax.prune.hessian import build_calibration_set
from ellava_jax.prune.masks import (
    masks_from_params,
    mean_sparsity,
    policy_to_sparsities,
    save_masks,
    sparsity_summary,
)
from ellava_jax.prune.owl import owl_layer_sparsities
from ellava_jax.prune.pipeline import prune_model
from ellava_jax.report import plots
from ellava_jax.search.evolve import evolve
from ellava_jax.search.fitness import fitness
from ellava_jax.search.policy import PolicySpace
from ellava_jax.search.projector import train_projector
from ellava_jax.search.proxy_batches import FitnessBatches

log = logging.getLogger(__name__)


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
    settings (see `app/resume.py`); a finished one returns its result unchanged.

    Args:
      evaluate: `evaluate(config, params) -> {"accuracy": ..., ...}` or None (no accuracy).
      stop_after_round: simulate a kill after this round (tests).
      fresh: start afresh, removing what `out_dir` holds (`--overwrite`).

    With several processes (`ellava_jax.distributed`) every process calls this; process 0
    holds the run's lock, decides whether it resumes, writes the outputs and speaks.
    """
    say = distributed.quiet(say)
    progress = progress and distributed.is_main()
    with contextlib.ExitStack() as held:

        def open_run():
            if fresh and os.path.lexists(out_dir) and not os.path.isdir(out_dir):
                os.remove(out_dir)  # --overwrite of a file
            os.makedirs(out_dir, exist_ok=True)
            held.enter_context(resume.RunLock(out_dir))
            if fresh:
                resume.clear(out_dir)
            if read_marker(out_dir) is None:
                write_marker(out_dir, "search")
            return resume.open_run(out_dir, settings, say)

        finished = distributed.agree(open_run)  # process 0's answer, in every process
        if finished is not None:
            return finished
        return _run_search(settings, out_dir, evaluate, stop_after_round, progress, say)


@dataclasses.dataclass
class _Run:
    """What every stage of one search reads: the model, its policy space, the proxy samples,
    the dense calibration set, the phase clock and where to report progress."""

    settings: object
    out_dir: str
    config: object
    params: dict
    model_dir: str | None
    space: PolicySpace
    proxy: object
    calib: object
    clock: PhaseClock
    progress: bool
    say: object
    mesh: object  # jax.sharding.Mesh (size 1: one device, nothing sharded)


def _run_search(settings, out_dir, evaluate, stop_after_round, progress, say) -> dict:
    """The paper's Algorithm 1, stage by stage."""
    t_all = time.perf_counter()
    checkpoints = resume_point = None
    if settings.rounds > 0:  # read before the expensive work: a corrupt round falls back
        checkpoints = ckpt.RoundCheckpoints(os.path.join(out_dir, resume.CHECKPOINTS))
        resume_point = checkpoints.latest_intact(say)
    mesh = make_mesh(settings.mesh)  # size 1 (one device): nothing is split
    try:
        run = _prepare(settings, out_dir, progress, say, mesh)
        res, db_calls = None, 0
        if settings.rounds > 0:
            db = _level_database(run)
            db_calls = db.pruner_calls
            res = _evolve(run, db, checkpoints, resume_point, stop_after_round)
            del db
            best_idx, projector = res.best_idx, res.projector
        elif settings.baseline == "owl":  # no search: OWL's continuous layer sparsities
            best_idx, projector = None, run.params.get("multi_modal_projector")
        else:  # no search: uniform SparseGPT at p0
            best_idx, projector = run.space.uniform(), run.params.get("multi_modal_projector")
    finally:
        if checkpoints is not None:
            checkpoints.close()
    policy, sparsities = _policy(run, best_idx)
    pruned, final_calls = _final_prune(run, sparsities, projector)
    uniform, uniform_calls = _uniform_prune(run)
    _write_models(run, pruned, uniform, projector)
    accuracy = None
    if evaluate is not None:
        accuracy = {
            "dense": evaluate(run.config, run.params),
            "uniform": evaluate(run.config, uniform),
            "searched": evaluate(run.config, pruned),
        }
    obs_calls = {
        "database": db_calls,
        "final_reprune": final_calls,
        "search_total": db_calls + final_calls,
        "uniform_baseline": uniform_calls,
    }
    result = _result(
        run, policy, sparsities, best_idx, res, pruned, uniform, accuracy, obs_calls, t_all
    )
    if distributed.is_main():
        with atomic_file(os.path.join(out_dir, resume.RESULT_FILE)) as f:
            json.dump(result, f, indent=1)
        _plots(out_dir, result, res, settings)
    distributed.barrier("search result written")
    return result


def _prepare(settings, out_dir, progress, say, mesh) -> _Run:
    """The model (its params placed on the mesh), the policy space, the proxy samples and the
    dense model's calibration."""

    config, params, model_dir = load_model(settings.model)
    if mesh.size > 1:
        params = shard_params(config, params, mesh)
        shown = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
        hosts = jax.process_count()
        across = f" in {hosts} processes" if hosts > 1 else ""
        say(f"mesh {shown} over {mesh.size} {mesh.devices.flat[0].platform} devices{across}")
        for line in mesh_notes(config, mesh):
            say(f"mesh: {line}")
    space = PolicySpace(
        config, settings.p0, settings.granularity, settings.step, settings.width, settings.tol
    )
    proxy = search_proxy(settings, config, model_dir)
    calib = build_calibration_set(
        config, params, proxy.calibration_batches(), settings.calib_batch_size
    )
    say(
        f"search: {config.text.num_hidden_layers} decoder layers, {space.n_entries} policy entries, "
        f"levels {space.levels.tolist()}, {calib.n_samples} proxy samples"
    )
    return _Run(
        settings,
        out_dir,
        config,
        params,
        model_dir,
        space,
        proxy,
        calib,
        PhaseClock(),
        progress,
        say,
        mesh,
    )


def _with_projector(params: dict, projector) -> dict:
    """`params` with `projector` as its multi_modal_projector; unchanged when the model has
    none (projector None: a text-only LLaMA)."""
    return params if projector is None else dict(params, multi_modal_projector=projector)


def _level_database(run: _Run):
    """Every decoder matrix pruned once at every grid level (dense Hessians)."""
    s = run.settings
    with run.clock("database"):
        db = build_database(
            run.config,
            run.params,
            run.calib,
            run.space.levels,
            where=s.database_storage,
            batch_size=s.calib_batch_size,
            progress=run.progress,
            devices=local_devices(run.mesh) if run.mesh.size > 1 else None,
        )
        if run.mesh.size > 1:  # stacks split like their weights, on arrival from the host
            db.place = functools.partial(shard_kernels, run.config, mesh=run.mesh)
            if s.database_storage == "device":
                db.stacks = db.place(db.stacks)
    run.say(
        f"level database: {db.pruner_calls} OBS calls ({run.space.n_levels} levels x "
        f"{db.n_matrices} matrices) in {db.seconds:.1f} s"
    )
    return db


def _evolve(run: _Run, db, checkpoints, resume_point, stop_after_round):
    """The rounds: population fitness from the database, top-k, c_m, projector training; the
    round log in rounds.jsonl."""
    s, config, params, space = run.settings, run.config, run.params, run.space
    with run.clock("search"):  # the proxy parts, every round, the winner's re-scoring
        fb = FitnessBatches(config, params, run.proxy, s)
        if s.selection == "staged":
            fb.set_stages(s.stage_shares, s.seed)
            run.say(
                "staged selection: "
                + ", then ".join(
                    f"{n} candidates on {fb.stage_rows(i)} samples ({share:g})"
                    for i, (share, n) in enumerate(s.stages())
                )
            )
        # how the population runs, the same in the fitness and the projector step
        layout = dict(
            streaming=s.streaming, row_chunk=s.row_chunk, candidate_chunk=s.candidate_chunk
        )

        def on_mesh():
            """The population's programs see the mesh (candidates over data, mesh.over_data);
            one device: no mesh, the programs of a plain run."""
            return jax.set_mesh(run.mesh) if run.mesh.size > 1 else contextlib.nullcontext()

        def score(projector, idx, stage=None):
            p = _with_projector(params, projector)
            with on_mesh():
                return fitness(
                    config,
                    p,
                    db,
                    space,
                    idx,
                    fb.parts(projector, stage),
                    s.eta,
                    cache=fb.cache_of(stage),
                    g_reading=s.g_reading,
                    **layout,
                )

        def train(projector, top_idx, c, round_index=0):
            if projector is None or not fb.has_mm or s.projector_steps <= 0:
                return projector, np.zeros(0)  # None: a text-only model, nothing to train
            p = _with_projector(params, projector)
            batches = None
            if s.projector_samples is not None:  # minibatches: each step its own samples
                batches = fb.training_samples(
                    s.projector_samples, s.seed, round_index, s.projector_steps
                )
            with on_mesh():
                return train_projector(
                    config,
                    p,
                    db,
                    space,
                    top_idx,
                    c,
                    fb.training,
                    steps=s.projector_steps,
                    lr=s.projector_lr,
                    mass=s.projector_mass,
                    offload=s.projector_offload,
                    step_batches=batches,
                    **layout,
                )

        def show(r):
            where = mean_where = ""
            if "stages" in r.extra:  # which slice each figure was read on
                b = r.extra["best_stage"]
                where = f" on stage {b + 1} ({r.extra['stages'][b]['share']:g} of the proxy)"
                mean_where = " on stage 1"
            run.say(
                f"round {r.round + 1}/{s.rounds}: best J {r.best_fitness:.4f}{where} (L "
                f"{r.best_loss:.4f}, G {r.best_g:.3f}), mean J {r.mean_fitness:.4f}{mean_where}, "
                f"mean sparsity {r.best_mean_sparsity:.3f}, {r.seconds:.1f} s"
            )

        res = evolve(
            s,
            params,
            space,
            score,
            train,
            checkpoints,
            resume=resume_point,
            stop_after_round=stop_after_round,
            on_round=show,
        )
    if distributed.is_main():
        with atomic_file(os.path.join(run.out_dir, "rounds.jsonl")) as f:
            for r in res.rounds:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    return res


def _policy(run: _Run, best_idx):
    """(policy as result.json writes it, per-matrix sparsities) of the winner, or of OWL's layer
    sparsities when there is no winner (`baseline: owl`)."""
    if best_idx is not None:
        return run.space.as_policy(best_idx), run.space.per_matrix(best_idx)
    s = run.settings
    owl = owl_layer_sparsities(
        run.config,
        run.params,
        run.calib,
        s.p0,
        s.owl_m,
        s.owl_lambda,
        batch_size=s.calib_batch_size,
        progress=run.progress,
    )
    run.say("OWL layer sparsities: " + " ".join(f"{x:.4f}" for x in owl))
    return owl, policy_to_sparsities(run.config, owl)


def _final_prune(run: _Run, sparsities, projector):
    """Sequential SparseGPT with the winning policy and the evolved projector."""
    s = run.settings
    with run.clock("final_prune"):
        final_params = _with_projector(run.params, projector)
        final_calib = build_calibration_set(
            run.config, final_params, run.proxy.calibration_batches(), s.calib_batch_size
        )
        pruned, stats = prune_model(
            run.config,
            final_params,
            sparsities,
            "sparsegpt",
            final_calib,
            batch_size=s.calib_batch_size,
            progress=run.progress,
        )
    run.say(f"final sequential re-prune: {stats.pruner_calls} OBS calls in {stats.seconds:.1f} s")
    return pruned, stats.pruner_calls


def _uniform_prune(run: _Run):
    """The baseline: uniform SparseGPT at p0 with the original projector (one sequential
    prune). It reuses what the final re-prune compiled: compare `cost_ratio_excluding_compile`."""
    with run.clock("uniform_prune"):
        uniform, stats = prune_model(
            run.config,
            run.params,
            run.space.per_matrix(run.space.uniform()),
            "sparsegpt",
            run.calib,
            batch_size=run.settings.calib_batch_size,
            progress=run.progress,
        )
    return uniform, stats.pruner_calls


def _write_models(run: _Run, pruned, uniform, projector) -> None:
    """model/ and uniform/ (HF), checkpoint/ and projector/ (orbax), masks.npz. Several
    processes: process 0 writes the HF models and the masks, every process the orbax ones."""

    d, config = run.out_dir, run.config
    masks = masks_from_params(config, pruned)
    if jax.process_count() > 1:  # what process 0 writes alone, on its host
        pruned, uniform, masks = jax.tree.map(to_host, (pruned, uniform, masks))
    if distributed.is_main():
        save_hf_llava(os.path.join(d, "model"), config, pruned, copy_from=run.model_dir)
        save_hf_llava(os.path.join(d, "uniform"), config, uniform, copy_from=run.model_dir)
        save_masks(os.path.join(d, "masks.npz"), masks)
    ckpt.save_tree(os.path.join(d, "checkpoint"), pruned)
    if projector is not None:  # a text-only model has none
        ckpt.save_tree(os.path.join(d, "projector"), projector)


def _result(
    run: _Run, policy, sparsities, best_idx, res, pruned, uniform, accuracy, obs_calls, t_all
) -> dict:
    """result.json: the policy, sparsities, accuracy, OBS calls, timings and cost ratios."""
    space, clock = run.space, run.clock
    timings = clock.seconds()
    phases = [p for p in ("database", "search", "final_prune") if p in clock.wall]
    search_cost = sum(timings[f"{p}_s"] for p in phases)
    search_work = search_cost - sum(timings[f"{p}_compile_s"] for p in phases)
    return {
        "policy": policy,
        "policy_levels": None if best_idx is None else [int(x) for x in best_idx],
        "mean_sparsity": float(
            mean_sparsity(run.config, sparsities)
            if best_idx is None
            else space.mean_sparsity(best_idx)
        ),
        "measured_sparsity": sparsity_summary(run.config, pruned)["overall"],
        "uniform_measured_sparsity": sparsity_summary(run.config, uniform)["overall"],
        "accuracy": accuracy,
        "obs_calls": obs_calls,
        "candidates_evaluated": None if res is None else res.evaluated,
        "best_fitness": None if res is None else res.best_fitness,
        "timings_s": timings | {"total_s": time.perf_counter() - t_all},
        "cost_ratio_vs_uniform_prune": search_cost / max(timings["uniform_prune_s"], 1e-9),
        "cost_ratio_excluding_compile": search_work
        / max(timings["uniform_prune_s"] - timings["uniform_prune_compile_s"], 1e-9),
        "settings": dataclasses.asdict(run.settings),
        "model": run.model_dir or run.settings.model,
    }


def _plots(out_dir: str, result: dict, res, settings) -> None:
    """fitness.png, policy.png and accuracy.png beside result.json."""

    if res is not None and res.rounds:
        plots.fitness_over_rounds(
            [dataclasses.asdict(r) for r in res.rounds],
            os.path.join(out_dir, "fitness.png"),
            title=f"search at p0 = {settings.p0:g}",
        )
    plots.policy_bars(result["policy"], settings.p0, os.path.join(out_dir, "policy.png"))
    acc = result["accuracy"]
    if acc and all("per_category" in r for r in acc.values()):  # an evaluator of questions
        plots.accuracy_by_category(
            result["accuracy"],
            os.path.join(out_dir, "accuracy.png"),
            title=f"toy test split, p0 = {settings.p0:g}",
        )

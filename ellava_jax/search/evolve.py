"""The EfficientLLaVA search loop (the paper's Algorithm 1), checkpointed every round.

Per round t:
  1. the strategy (evosax GA by default, CMA-ES as an option) proposes a population of
     genomes; each is decoded to grid levels and repaired to the budget (round 0: random
     valid policies, as Algorithm 1's G_0);
  2. the whole population is scored by one vmapped fitness call (fitness.py), candidates
     assembled from the level database; with `selection: staged`, on growing slices of the
     proxy, the best few moving on (`staged_scores`, EvoPress's multi-step selection);
  3. the top-k are kept; their importance weights c_m (eq. 7) weight the projector's
     training loss (projector.py): the search space evolves;
     A text-only model (a plain LLaMA) has no projector: c_m is still computed and logged,
     and `train` leaves the projector None;
  4. the round's state (strategy, projector, archive, PRNG position) is checkpointed, so a
     killed search resumes and ends with the same result.
All randomness flows from one seed through `jax.random.fold_in(key, round)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax.algorithms import CMA_ES, SimpleGA
from flax import serialization

from ellava_jax.search.policy import PolicySpace
from ellava_jax.search.projector import importance_weights


class SearchInterrupted(RuntimeError):
    """Raised by `stop_after_round` (tests use it to simulate a killed search)."""


class Strategy:
    """evosax strategy over genomes in grid-step units; state converts to a plain dict for orbax."""

    def __init__(
        self, name: str, space: PolicySpace, population: int, init_std: float, elite_ratio: float
    ):

        self.name = name
        dummy = jnp.zeros(space.n_entries, jnp.float32)
        if name == "ga":
            self.algo = SimpleGA(population, dummy, std_schedule=optax.constant_schedule(init_std))
            self.algo.elite_ratio = elite_ratio
        elif name == "cmaes":
            self.algo = CMA_ES(population, dummy)
        else:
            raise ValueError(f"strategy {name!r}: expected 'ga' or 'cmaes'")
        self.params = self.algo.default_params
        if name == "cmaes":
            self.params = self.params.replace(std_init=init_std)
        self.centre = jnp.asarray(space.encode(space.uniform()))

    def init(self, key, population, fitness):
        if self.name == "ga":
            return self.algo.init(key, population, fitness, self.params)
        state = self.algo.init(key, self.centre, self.params)
        return self.tell(key, population, fitness, state)

    def ask(self, key, state):
        pop, state = self.algo.ask(key, state, self.params)
        return pop, state

    def tell(self, key, population, fitness, state):
        state, _ = self.algo.tell(key, population, fitness, state, self.params)
        return state

    def template(self, key):
        """A state of the right structure (to restore a checkpoint into)."""
        pop = jnp.zeros((self.algo.population_size, self.algo.num_dims), jnp.float32)
        fit = jnp.zeros((self.algo.population_size,), jnp.float32)
        return self.init(key, pop, fit)


@dataclass
class RoundLog:
    round: int
    best_fitness: float
    mean_fitness: float
    best_loss: float
    best_g: float
    best_policy: list
    best_mean_sparsity: float
    c_m: list
    projector_loss_first: float | None
    projector_loss_last: float | None
    seconds: float
    extra: dict = field(default_factory=dict)


def _round_rng(key, r: int, salt: int) -> np.random.Generator:
    k = jax.random.fold_in(jax.random.fold_in(key, r), salt)
    return np.random.default_rng(np.asarray(jax.random.key_data(k)).astype(np.uint64))


def state_to_tree(state) -> dict:
    return serialization.to_state_dict(state)


def tree_to_state(template, tree):
    return serialization.from_state_dict(template, tree)


@dataclass
class EvolutionResult:
    best_idx: np.ndarray  # [E] level indices of the winner
    best_fitness: float
    projector: dict | None  # the evolved projector parameters (None: a text-only model)
    rounds: list[RoundLog]
    archive_idx: np.ndarray  # [R, top_k, E]
    archive_fitness: np.ndarray  # [R, top_k]
    evaluated: int  # candidates scored in all


def evolve(
    settings,
    params: dict,
    space: PolicySpace,
    score,
    train,
    checkpoints=None,
    *,
    resume: tuple[int, dict, list] | None = None,
    stop_after_round: int | None = None,
    on_round=None,
) -> EvolutionResult:
    """Runs `settings.rounds` rounds of Algorithm 1.

    Args:
      score: `score(projector, idx [P, E]) -> (J, L, G)` arrays [P] (the vmapped fitness);
        with staged selection `score(projector, idx, stage)` scores on that stage's slice.
      train: `train(projector, top_idx, c, round_index=r) -> (projector, losses)`
        (search-space evolution).
      checkpoints: a `ckpt.RoundCheckpoints` each round is saved to.
      resume: `(round, arrays, logs)` of the round to continue after
        (`RoundCheckpoints.latest_intact`); the archive grows when `settings.rounds` was raised.
      stop_after_round: raise `SearchInterrupted` after checkpointing this round.
      on_round: called with each `RoundLog` (progress display).
    """
    strat = Strategy(
        settings.strategy,
        space,
        settings.population,
        settings.init_std,
        settings.top_k / settings.population,
    )
    st = _SearchState.start(settings, space, params.get("multi_modal_projector"))
    if resume is not None:
        st.restore(resume, strat, settings)
    for r in range(st.next_round, settings.rounds):
        log = _round(r, st, strat, settings, space, score, train)
        if checkpoints is not None:
            checkpoints.save(r, st.arrays(), st.logs)
        if on_round is not None:
            on_round(log)
        if stop_after_round is not None and r == stop_after_round:
            raise SearchInterrupted(f"stopped after round {r}")
    return _winner(st, settings, space, score)


@dataclass
class _SearchState:
    """What a round changes and a checkpoint keeps: the strategy state, the projector, the
    archive of each round's top-k (levels and J) and the round logs."""

    key: jax.Array
    projector: dict | None  # None: a text-only model (no projector; nothing to train or save)
    archive_idx: np.ndarray  # [R, top_k, E]
    archive_fitness: np.ndarray  # [R, top_k]
    logs: list
    strategy: object = None
    next_round: int = 0
    # [R, top_k] the stage each archived candidate reached (staged selection; else all 0)
    archive_stage: np.ndarray | None = None

    @classmethod
    def start(cls, settings, space: PolicySpace, projector) -> _SearchState:
        k, e = settings.top_k, space.n_entries
        return cls(
            jax.random.key(settings.seed),
            projector,
            np.zeros((settings.rounds, k, e), np.int32),
            np.full((settings.rounds, k), np.inf, np.float32),
            [],
            archive_stage=np.zeros((settings.rounds, k), np.int32),
        )

    def restore(self, resume, strat: Strategy, settings) -> None:
        """Continues after a checkpointed round; the archive grows when rounds were raised."""
        last, saved, rows = resume
        saved = jax.tree_util.tree_map(jnp.asarray, saved)
        k, e = self.archive_idx.shape[1:]
        if saved["archive_idx"].shape[1:] != (k, e) or last >= settings.rounds:
            raise ValueError(
                f"checkpoint of round {last + 1} holds an archive of shape "
                f"{saved['archive_idx'].shape}, not (rounds, {k}, {e}) for {settings.rounds} rounds"
            )
        self.strategy = tree_to_state(strat.template(jax.random.key(0)), saved["strategy"])
        self.projector = saved.get("projector")  # absent: a text-only model's search
        n = min(saved["archive_idx"].shape[0], settings.rounds)
        self.archive_idx[:n] = np.asarray(saved["archive_idx"])[:n]
        self.archive_fitness[:n] = np.asarray(saved["archive_fitness"])[:n]
        if "archive_stage" in saved:  # absent: a checkpoint of one stage (all 0)
            self.archive_stage[:n] = np.asarray(saved["archive_stage"])[:n]
        self.logs = [RoundLog(**row) for row in rows]
        self.next_round = last + 1

    def arrays(self) -> dict:
        out = {
            "strategy": state_to_tree(self.strategy),
            "projector": self.projector,
            "archive_idx": self.archive_idx,
            "archive_fitness": self.archive_fitness,
            "archive_stage": self.archive_stage,
        }
        if self.projector is None:  # a text-only model: the checkpoint holds no projector
            del out["projector"]
        return out


def _round(r: int, st: _SearchState, strat: Strategy, settings, space, score, train) -> RoundLog:
    """One round: propose (round 0 of the GA: random valid policies), score the population,
    tell the strategy, archive the top-k, train the projector on their c_m-weighted loss."""
    t0 = time.perf_counter()
    k_ask, k_tell = jax.random.split(jax.random.fold_in(st.key, r))
    rng = _round_rng(st.key, r, 1)
    first_ga = r == 0 and settings.strategy == "ga"
    if first_ga:
        idx = space.random(settings.population, rng)
    else:
        if st.strategy is None:  # CMA-ES round 0: sample around the uniform policy
            st.strategy = strat.algo.init(k_ask, strat.centre, strat.params)
        genomes, st.strategy = strat.ask(k_ask, st.strategy)
        idx = np.stack([space.decode(g, rng) for g in np.asarray(genomes)])
    assert space.is_valid(idx).all()
    sc = staged_scores(settings, idx, st.projector, score)
    j, loss, g, order = sc["j"], sc["loss"], sc["g"], sc["order"]
    pop = jnp.asarray(space.encode(idx))
    # the strategy sees J itself (one stage: today's search, unchanged) or ranks (J values
    # of different stages do not compare)
    told = j if len(sc["stages"]) == 1 else _ranks_of(order)
    if first_ga:
        st.strategy = strat.init(k_tell, pop, jnp.asarray(told, jnp.float32))
    else:
        st.strategy = strat.tell(k_tell, pop, jnp.asarray(told, jnp.float32), st.strategy)
    top = order[: settings.top_k]
    st.archive_idx[r], st.archive_fitness[r] = idx[top], j[top]
    st.archive_stage[r] = sc["reached"][top]
    c = importance_weights(idx[top], settings.neighbors, settings.weighting)
    st.projector, plosses = train(st.projector, idx[top], c, round_index=r)
    b = order[0]
    first = sc["first"]  # every candidate on the first stage's slice: comparable
    extra = {
        "population_terms": population_terms(first["j"], first["loss"], first["g"], settings.eta)
    }
    if len(sc["stages"]) > 1:
        extra |= {"stages": sc["stages"], "best_stage": int(sc["reached"][b])}
    log = RoundLog(
        round=r,
        best_fitness=float(j[b]),
        mean_fitness=float(first["j"].mean()),
        best_loss=float(loss[b]),
        best_g=float(g[b]),
        best_policy=space.sparsities(idx[b]),
        best_mean_sparsity=float(space.mean_sparsity(idx[b])),
        c_m=[float(x) for x in c],
        projector_loss_first=float(plosses[0]) if len(plosses) else None,
        projector_loss_last=float(plosses[-1]) if len(plosses) else None,
        seconds=time.perf_counter() - t0,
        extra=extra,
    )
    st.logs.append(log)
    return log


def staged_scores(settings, idx, projector, score) -> dict:
    """The population scored stage by stage (`settings.stages()`; one stage: the whole proxy,
    every candidate, `score(projector, idx)` as the paper does).

    Staged: every candidate is scored on the first stage's slice, the best `survivors` move on
    to the next, larger slice, and so on. Each candidate's J, L and G are those of the last
    stage it reached (G reads no tokens: the same at every stage); `order` ranks the furthest
    stage first, then the lowest J there. Returns {j, loss, g, reached, order, first (the
    first stage's values, every candidate), stages (per stage: share, scored, best, mean)}.
    """
    stages = settings.stages()
    n = len(idx)
    j, loss, g = (np.full(n, np.nan) for _ in range(3))
    reached = np.zeros(n, np.int32)
    alive, stats, first = np.arange(n), [], None
    for s, (share, count) in enumerate(stages):
        alive = alive[:count]  # the previous stage's best first
        args = (projector, idx[alive]) if len(stages) == 1 else (projector, idx[alive], s)
        js, ls, gs = (np.asarray(x, np.float64) for x in score(*args))
        j[alive], loss[alive], g[alive], reached[alive] = js, ls, gs, s
        if first is None:
            first = {"j": js, "loss": ls, "g": gs}
        stats.append(
            {
                "share": share,
                "scored": len(alive),
                "best": float(js.min()),
                "mean": float(js.mean()),
            }
        )
        alive = alive[np.argsort(js, kind="stable")]
    order = np.lexsort((j, -reached))  # stable: ties keep the population's order
    return {
        "j": j,
        "loss": loss,
        "g": g,
        "reached": reached,
        "order": order,
        "first": first,
        "stages": stats,
    }


def _ranks_of(order) -> np.ndarray:
    """Rank (0 = best) of each candidate from the best-first `order`."""
    ranks = np.empty(len(order), np.float64)
    ranks[order] = np.arange(len(order))
    return ranks


def _ranks(x) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x, np.float64), kind="stable"), kind="stable")


def spearman(a, b) -> float | None:
    """Spearman rank correlation of `a` and `b` (without ties handling: fitness values rarely
    tie); None when either is constant or shorter than 2."""
    ra, rb = _ranks(a), _ranks(b)
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def population_terms(j, loss, g, eta: float) -> dict:
    """How each term of J = L + eta*G spreads over one round's population, and which one sets
    the ranking: means and sample stds of L, G and eta*G, and the Spearman rank correlations of
    J with L and with G (without ties handling: fitness values rarely tie)."""
    j, loss, g = (np.asarray(x, np.float64) for x in (j, loss, g))

    def std(x):
        return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0

    return {
        "loss_mean": float(loss.mean()),
        "loss_std": std(loss),
        "g_mean": float(g.mean()),
        "g_std": std(g),
        "eta_g_std": eta * std(g),
        "rank_corr_j_loss": spearman(j, loss),
        "rank_corr_j_g": spearman(j, g),
    }


def _winner(st: _SearchState, settings, space: PolicySpace, score) -> EvolutionResult:
    """Every archived top candidate re-scored under the final projector; the lowest J wins.

    Staged selection re-scores only the archived candidates that reached the last stage (a
    round's best few), on the last stage's slice: the pick costs a few candidates' passes,
    not the whole archive's (up to rounds x top_k) on the whole proxy."""
    p, e = settings.population, space.n_entries
    last = len(settings.stages()) - 1
    kept = np.isfinite(st.archive_fitness) & (st.archive_stage == last)
    flat = st.archive_idx[kept].reshape(-1, e)
    uniq = np.unique(flat, axis=0) if len(flat) else space.uniform()[None]
    scores = []
    for s in range(0, len(uniq), p):
        chunk = uniq[s : s + p]
        padded = (
            np.concatenate([chunk, np.repeat(chunk[:1], p - len(chunk), 0)])
            if len(chunk) < p
            else chunk
        )
        args = (st.projector, padded) if last == 0 else (st.projector, padded, last)
        scores.append(np.asarray(score(*args)[0])[: len(chunk)])
    scores = np.concatenate(scores)
    best = int(np.argmin(scores))
    return EvolutionResult(
        best_idx=uniq[best],
        best_fitness=float(scores[best]),
        projector=st.projector,
        rounds=st.logs,
        archive_idx=st.archive_idx,
        archive_fitness=st.archive_fitness,
        # scorings in all (staged: a candidate counts once per stage it reached), the pick's too
        evaluated=settings.rounds * sum(n for _, n in settings.stages()) + len(uniq),
    )

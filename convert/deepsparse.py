"""DeepSparse timing, run as a subprocess in ``.venv-deepsparse``.

DeepSparse 1.8 needs Python <= 3.11 and numpy < 2 (under numpy 2 it returns silently wrong
outputs), while JAX needs numpy >= 2; so it lives in its own environment, created by
``scripts/setup_deepsparse.sh``, and this module drives ``convert/deepsparse_runner.py`` with that
environment's Python. Nothing here imports deepsparse.

Every timing first runs each model once in DeepSparse and in onnxruntime on the same inputs;
when outputs differ beyond tolerance the runner exits non-zero and :class:`OutputMismatchError`
is raised: no figures are reported.

Usage::

    bash scripts/setup_deepsparse.sh                      # once; idempotent
    python -m convert.onnx --model DIR --out onnx/        # an HF directory, e.g. a pruned one
    ellava bench-cpu --model DENSE_DIR --compare PRUNED_DIR  # bench_cpu below, dense first
    python benchmarks/bench_deepsparse_slice.py           # LLaMA-7B-width slice, dense vs 50/70%

Timing notes: models are timed in interleaved rounds in one process (one DeepSparse context,
so engines do not compete for threads); besides medians the results carry the paired ratio
(median of per-round ratios) and the fastest runs, which hold up better on a shared machine.
DeepSparse's ``input_shapes`` override rewrites the model file in place, so the runner compiles
a static-shape copy instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert import onnx as conv
from ellava_jax.errors import EnvironmentFailure, UserError

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "deepsparse_runner.py"
EXIT_MISMATCH = 3


class OutputMismatchError(RuntimeError):
    """DeepSparse's outputs differ from onnxruntime's: timings are not reported."""


class DeepSparseUnavailable(EnvironmentFailure):
    """``.venv-deepsparse`` is missing: run scripts/setup_deepsparse.sh."""


DEFAULT_SEQ_LEN = 256


def default_seq_len(configs: Sequence[Any]) -> int:
    """The default benchmark length: ``DEFAULT_SEQ_LEN`` (256), or half the shortest context
    when that is shorter: min(256, max_position_embeddings // 2), which leaves the decode step
    its extra position. Not the context less one: on the toy (context 256) DeepSparse 1.8's
    prefill disagrees with onnxruntime on the KV cache at 241-255 tokens (measured), and the
    check refuses to report."""
    return min(DEFAULT_SEQ_LEN, *(int(_text(c).max_position_embeddings) // 2 for c in configs))


def check_seq_len(configs: Sequence[Any], seq_len: int, graphs: Sequence[str], names=None) -> None:
    """Refuses a ``seq_len`` below 1, or one a model's context cannot hold: the prefill reads
    positions 0..seq_len-1, the decode step position seq_len (so it needs seq_len + 1)."""

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"--seq-len={seq_len!r}: must be a whole number >= 1")
    need = seq_len + 1 if "decode" in graphs else seq_len
    for i, c in enumerate(configs):
        ctx = int(_text(c).max_position_embeddings)
        if need > ctx:
            name = names[i] if names else f"model {i}"
            step = " and one decode step" if "decode" in graphs else ""
            raise UserError(
                f"--seq-len={seq_len}: {name} has a context of {ctx} positions, fewer than "
                f"{need} ({seq_len} tokens{step}); use --seq-len {ctx - 1 if step else ctx} or "
                "less"
            )


def _checkout() -> Path | None:
    """The source tree this module runs from, when it is a checkout (not an installed wheel)."""
    if (ROOT / "scripts" / "setup_deepsparse.sh").is_file() and (ROOT / "pyproject.toml").is_file():
        return ROOT
    return None


def _candidates() -> list[Path]:
    """Where the DeepSparse environment's interpreter is looked for: ``$ELLAVA_DEEPSPARSE_PYTHON``
    alone when it is set; else ``$DEEPSPARSE_VENV/bin/python`` (where
    ``scripts/setup_deepsparse.sh`` puts it when that is set), then the checkout's
    ``.venv-deepsparse`` (when running from a source tree, not an installed wheel)."""
    if env := os.environ.get("ELLAVA_DEEPSPARSE_PYTHON"):
        return [Path(env)]
    out = []
    if venv := os.environ.get("DEEPSPARSE_VENV"):
        out.append(Path(venv) / "bin" / "python")
    if (tree := _checkout()) is not None:
        out.append(tree / ".venv-deepsparse" / "bin" / "python")
    return out


def deepsparse_python() -> Path:
    """The DeepSparse environment's interpreter: the first of ``_candidates()`` that exists,
    else the first place looked (an installed package's ``.venv-deepsparse``, which never
    exists, when there is none). ``setup_hint()`` says how to create it."""
    places = _candidates()
    for p in places:
        if p.exists():
            return p
    return places[0] if places else ROOT / ".venv-deepsparse" / "bin" / "python"


def available() -> bool:
    return deepsparse_python().exists()


def setup_hint() -> str:
    """One line: where DeepSparse's environment was looked for, and how to create it."""
    if env := os.environ.get("ELLAVA_DEEPSPARSE_PYTHON"):
        looked = f"ELLAVA_DEEPSPARSE_PYTHON={env}"
    else:
        looked = ", ".join(str(p) for p in _candidates()) or "ELLAVA_DEEPSPARSE_PYTHON (unset)"
    if (tree := _checkout()) is not None:
        how = f"create it with `bash {tree / 'scripts' / 'setup_deepsparse.sh'}`"
    else:
        how = (
            "create it with `bash scripts/setup_deepsparse.sh` in an ellava-jax checkout (a "
            "Python 3.11 venv with deepsparse==1.8.0 and numpy<2) and set "
            "ELLAVA_DEEPSPARSE_PYTHON to its bin/python"
        )
    return f"DeepSparse's environment not found (looked at {looked}); {how}"


def _text(cfg: Any) -> Any:
    return getattr(cfg, "text", None) or cfg


def prefill_inputs(
    cfg: Any, *, batch: int = 1, seq: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random ``inputs_embeds`` + all-ones ``attention_mask`` for a prefill graph."""
    t = _text(cfg)
    rng = np.random.default_rng(seed)
    return {
        "inputs_embeds": rng.standard_normal((batch, seq, t.hidden_size)).astype(np.float32),
        "attention_mask": np.ones((batch, seq), np.int64),
    }


def decode_inputs(
    cfg: Any, *, batch: int = 1, past: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for a decode-step graph with a ``past``-token cache."""
    t = _text(cfg)
    rng = np.random.default_rng(seed)
    n_kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    feeds = {
        "inputs_embeds": rng.standard_normal((batch, 1, t.hidden_size)).astype(np.float32),
        "attention_mask": np.ones((batch, past + 1), np.int64),
    }
    for i in range(t.num_hidden_layers):
        for n in ("key", "value"):
            feeds[f"past_key_values.{i}.{n}"] = rng.standard_normal((batch, n_kv, past, hd)).astype(
                np.float32
            )
    return feeds


def benchmark_models(
    models: Mapping[str, str | os.PathLike],
    inputs: Mapping[str, np.ndarray],
    *,
    engines: Sequence[str] | Mapping[str, Sequence[str]] = ("deepsparse", "onnxruntime"),
    warmup: int = 2,
    runs: int = 5,
    rounds: int = 1,
    num_cores: int | None = None,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    timeout: float | None = None,
    workdir: str | os.PathLike | None = None,
) -> dict:
    """Check then time several ONNX models on the same inputs in one DeepSparse process.

    ``engines`` is one list for all models or {model name: list}. Returns the runner's JSON:
    ``{"outputs_match": True, "models": {name: {"engines": {engine: {"median_ms", "times_ms"}},
    "outputs": {...}, "deepsparse_compile": {"supported_pct", "subgraphs", "failures", "log"}}}}``.
    Raises :class:`OutputMismatchError` when DeepSparse disagrees with onnxruntime.
    """
    py = deepsparse_python()
    if not py.exists():
        raise DeepSparseUnavailable(f"{py} not found: run scripts/setup_deepsparse.sh")
    own_tmp = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="ellava-ds-") if own_tmp else workdir)
    wd.mkdir(parents=True, exist_ok=True)
    np.savez(wd / "inputs.npz", **{k: np.asarray(v) for k, v in inputs.items()})
    spec = {
        "models": [
            {
                "name": name,
                "path": os.fspath(Path(path).resolve()),
                "engines": list(engines[name] if isinstance(engines, Mapping) else engines),
            }
            for name, path in models.items()
        ],
        "inputs": os.fspath(wd / "inputs.npz"),
        "warmup": warmup,
        "runs": runs,
        "rounds": rounds,
        "num_cores": num_cores,
        "atol": atol,
        "rtol": rtol,
        "log_dir": os.fspath(wd),
    }
    (wd / "spec.json").write_text(json.dumps(spec))
    out = wd / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [os.fspath(py), "-P", os.fspath(RUNNER), os.fspath(wd / "spec.json"), os.fspath(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    result = json.loads(out.read_text()) if out.exists() else None
    if own_tmp:  # keep only the small files (result, DeepSparse compile logs)
        (wd / "inputs.npz").unlink(missing_ok=True)
    if proc.returncode == EXIT_MISMATCH:
        raise OutputMismatchError(
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "outputs differ"
        )
    if proc.returncode != 0 or result is None:
        raise RuntimeError(
            f"DeepSparse runner failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    result["workdir"] = os.fspath(wd)
    return result


def benchmark(path: str | os.PathLike, inputs: Mapping[str, np.ndarray], **kw) -> dict:
    """One model: returns {"outputs_match", "engines": {engine: {"median_ms", ...}}, ...}."""
    res = benchmark_models({"model": path}, inputs, **kw)
    m = res["models"]["model"]
    return {
        "outputs_match": res["outputs_match"],
        "engines": m["engines"],
        "outputs": m["outputs"],
        "deepsparse_compile": m["deepsparse_compile"],
        "versions": res["versions"],
    }


def paired_speedup(base: Mapping, other: Mapping) -> float:
    """Median over rounds of (base round median / other round median).

    Rounds interleave the models, so each ratio compares runs taken close in time: steadier
    than a ratio of overall medians on a machine with other load."""
    r = int(base["runs_per_round"])
    a, b = np.asarray(base["times_ms"]), np.asarray(other["times_ms"])
    n = min(len(a), len(b)) // r
    if n == 0:
        return float("nan")
    ra = np.median(a[: n * r].reshape(n, r), axis=1)
    rb = np.median(b[: n * r].reshape(n, r), axis=1)
    return float(np.median(ra / rb))


def speedup_limit(sparsity: float) -> float:
    """The 1 / (1 - s) bound on the speedup of a fully weight-bound model at sparsity s."""
    return float("inf") if sparsity >= 1 else 1.0 / (1.0 - sparsity)


_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def decoder_sparsity(params: Mapping) -> float:
    """Fraction of exact zeros over the decoder's linear kernels."""
    zeros = total = 0
    stack = params["language_model"]["layers"]  # every leaf stacked over the layers
    for mod, name in _LINEARS:
        for w in np.asarray(stack[mod][name]["kernel"]):
            zeros += int(np.count_nonzero(w == 0))
            total += w.size
    return zeros / max(total, 1)


def bench_cpu(
    models: Sequence[str],
    *,
    load: Callable[[str], tuple],
    load_config: Callable[[str], Any] | None = None,
    seq_len: int | None = None,
    graphs: Sequence[str] = ("prefill", "decode"),
    num_cores: int | None = None,
    rounds: int = 5,
    runs: int = 2,
    workdir: str | os.PathLike | None = None,
) -> dict:
    """Time the decoders of several models (names as ``load`` takes them, e.g. ``--model``'s
    ``toy``, ``tiny`` or HF directories; the first is the baseline, normally dense) in
    DeepSparse, and the first in onnxruntime too.

    The caller resolves the names: ``load(name)`` returns ``(config, params, ...)``, called for
    one model at a time while exporting; ``load_config(name)`` the config alone, for the checks
    made before any export (None: ``load(name)[0]``, which reads the weights once more).

    Each model's decoder is exported (prefill over ``seq_len`` tokens; one decode step at a
    ``seq_len`` context), checked against onnxruntime, then timed in interleaved rounds.
    ``seq_len`` None: ``default_seq_len`` (256, or less for a model whose context is shorter);
    one that a model's context cannot hold is a UserError, raised before any export.
    Without ``workdir`` the exports live in a temporary directory that is removed at the end,
    on an error and on Ctrl-C.
    Returns ``{"engine": "deepsparse", "outputs_match": bool, "graphs": {graph: {model:
    {"sparsity", "median_ms", "tokens_per_s", "speedup", "speedup_paired", "limit",
    "onnxruntime_median_ms" (first model)}}}}``; speedups are over the first model in
    DeepSparse, same run. Raises :class:`OutputMismatchError` on a mismatch.
    """

    graphs = tuple(graphs)
    unknown = [g for g in graphs if g not in ("prefill", "decode")]
    if unknown or not graphs:
        raise UserError(f"--graphs={','.join(graphs)}: expected prefill, decode or both")
    if load_config is None:
        load_config = lambda m: load(m)[0]  # noqa: E731
    configs = [load_config(m) for m in models]  # every model checked before any export
    if seq_len is None:
        seq_len = default_seq_len(configs)
    check_seq_len(configs, seq_len, graphs, names=list(models))
    py = deepsparse_python()
    if not py.exists():
        raise DeepSparseUnavailable(f"{py} not found: run scripts/setup_deepsparse.sh")
    if workdir is not None:
        return _bench_cpu(models, load, seq_len, graphs, num_cores, rounds, runs, Path(workdir))
    wd = Path(tempfile.mkdtemp(prefix="ellava-bench-cpu-"))
    try:
        return _bench_cpu(models, load, seq_len, graphs, num_cores, rounds, runs, wd)
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def _bench_cpu(models, load, seq_len, graphs, num_cores, rounds, runs, wd: Path) -> dict:

    paths: dict[str, dict[str, str]] = {g: {} for g in graphs}
    sparsity, labels, cfg = {}, [], None
    for i, spec in enumerate(models):
        label = f"{i}:{Path(spec).name or spec}"
        labels.append(label)
        cfg, params = load(spec)[:2]
        params = jax.tree_util.tree_map(np.asarray, params)
        sparsity[label] = decoder_sparsity(params)
        for g in graphs:
            fn = conv.export_decoder_decode if g == "decode" else conv.export_decoder_prefill
            paths[g][label] = os.fspath(wd / f"{g}_{i}.onnx")
            fn(cfg, params, paths[g][label])
        del params
    out = {"engine": "deepsparse", "outputs_match": None, "seq_len": seq_len, "graphs": {}}
    for g in graphs:
        feeds = (
            decode_inputs(cfg, past=seq_len) if g == "decode" else prefill_inputs(cfg, seq=seq_len)
        )
        engines = {m: ["deepsparse"] + (["onnxruntime"] if m == labels[0] else []) for m in labels}
        try:
            res = benchmark_models(
                paths[g],
                feeds,
                engines=engines,
                rounds=rounds,
                runs=runs,
                warmup=1,
                num_cores=num_cores,
                workdir=wd / f"run_{g}",
            )
        except OutputMismatchError:
            out["outputs_match"] = False
            raise
        out["outputs_match"] = True
        base = res["models"][labels[0]]["engines"]["deepsparse"]
        rows = {}
        for m in labels:
            t = res["models"][m]["engines"]["deepsparse"]
            rows[m] = {
                "sparsity": sparsity[m],
                "median_ms": t["median_ms"],
                "tokens_per_s": (seq_len if g == "prefill" else 1) / (t["median_ms"] / 1e3),
                "speedup": base["median_ms"] / t["median_ms"],
                "speedup_paired": paired_speedup(base, t),
                "limit": speedup_limit(sparsity[m]),
                "deepsparse_supported_pct": res["models"][m]["deepsparse_compile"]["supported_pct"],
            }
        ort = res["models"][labels[0]]["engines"]["onnxruntime"]
        rows[labels[0]]["onnxruntime_median_ms"] = ort["median_ms"]
        out["graphs"][g] = rows
    return out

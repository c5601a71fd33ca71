"""`ellava report DIR`: report.md and its plots from what a demo (or search) run directory holds.

Reads, when present (every number and figure comes from these files, nothing is typed in):

  demo.json                  the demo's manifest (model, p0s, step status and timings, notes)
  dense/result.json          dense accuracy
  search-p<p0>/result.json   policy, accuracy (dense / uniform / searched), OBS calls, timings
  search-p<p0>/rounds.jsonl  best and mean fitness per round
  search-p<p0>/model/config.json   the model's sizes (analytic FLOPs)
  bench-cpu/bench.json       DeepSparse timings (`convert.deepsparse.bench_cpu`)
  fitprune/result.json       the FitPrune recipe on top of a searched model: FLOPs, accuracy

A directory written by `ellava search` alone (result.json at its top) is read as one p0.

Writes DIR/report.md and PNGs (by default in DIR/report/):
  tradeoff.png          accuracy vs CPU speedup, uniform vs EfficientLLaVA across p0 (the
                        paper's Figure 1); the speedup is DeepSparse's measured one when
                        bench-cpu ran, else the analytic prefill FLOPs ratio, and the axis says so
  policy-p<p0>.png      per-layer sparsity of the found policy
  fitness-p<p0>.png     best and mean fitness per round
  accuracy.png          accuracy by category, dense / uniform / searched (+ FitPrune)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ellava_jax.errors import MissingInput
from ellava_jax.report import plots  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REF_TEXT_TOKENS = 64  # reference prompt for the analytic speedup when no FitPrune result says


def _load_json(path: Path):
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: str | os.PathLike) -> dict:
    """Everything the report needs, read from the run directory's files.

    With a demo manifest (demo.json), a step's directory is read only when the manifest lists
    that step as finished in this run with the same content key as the directory's step.json:
    output left over from a run with other settings is ignored, never mixed in.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise MissingInput(f"{d}: no such run directory")
    manifest = _load_json(d / "demo.json") or {}
    steps = manifest.get("steps") or {}

    def current(name: str) -> bool:
        if not steps:
            return True
        s = steps.get(name)
        step = _load_json(d / name / "step.json")
        return bool(
            s and s["status"] in ("done", "cached") and step and step.get("key") == s["key"]
        )

    def load(name: str, file: str):
        return _load_json(d / name / file) if current(name) else None

    searches = {}
    for sub in sorted(d.glob("search-p*")):
        m = re.fullmatch(r"search-p([0-9.]+)", sub.name)
        res = _load_json(sub / "result.json")
        if m and res is not None and current(sub.name):
            searches[float(m.group(1))] = {
                "dir": sub,
                "result": res,
                "rounds": _load_jsonl(sub / "rounds.jsonl"),
            }
    single = _load_json(d / "result.json")
    if not searches and single is not None and "policy" in single:
        p0 = float(single["settings"]["p0"])
        searches[p0] = {"dir": d, "result": single, "rounds": _load_jsonl(d / "rounds.jsonl")}
    if not searches:
        raise MissingInput(
            f"{d}: no search results (search-p*/result.json or result.json); run `ellava demo` "
            "or `ellava search` into it first"
        )
    return {
        "dir": d,
        "manifest": manifest,
        "dense": load("dense", "result.json"),
        "searches": dict(sorted(searches.items())),
        "bench": load("bench-cpu", "bench.json"),
        "fitprune": load("fitprune", "result.json"),
    }


# ---------------------------------------------------------------------------------------------
# speedups


def _policy_sparsity(policy: list) -> dict:
    return {
        i: {m: (s[j] if isinstance(s, list) else s) for j, m in enumerate(LINEARS)}
        for i, s in enumerate(policy)
    }


def analytic_speedups(run: dict) -> dict[tuple[str, float], float]:
    """(role, p0) -> dense / sparse decoder prefill FLOPs, from each model's config and policy."""
    from ellava_jax.config import LlavaConfig
    from ellava_jax.eval.flops import decoder_prefill_flops, total_flops

    fp = run["fitprune"] or {}
    text = (fp.get("reference_prompt") or {}).get("text_tokens") or REF_TEXT_TOKENS
    out = {}
    for p0, s in run["searches"].items():
        cfg_path = s["dir"] / "model" / "config.json"
        if not cfg_path.exists():
            continue
        config = LlavaConfig.from_hf_config(str(cfg_path))
        dense = total_flops(decoder_prefill_flops(config, text, 1))
        r = s["result"]
        uni = total_flops(decoder_prefill_flops(config, text, 1, sparsity=float(p0)))
        sea = total_flops(
            decoder_prefill_flops(config, text, 1, sparsity=_policy_sparsity(r["policy"]))
        )
        out[("uniform", p0)] = dense / uni
        out[("searched", p0)] = dense / sea
    out["text_tokens"] = text
    return out


def measured_speedups(bench: dict | None, graph: str) -> dict[tuple[str, float | None], float]:
    """(role, p0) -> DeepSparse speedup over dense in the same run, for one graph."""
    if not bench or graph not in bench.get("graphs", {}):
        return {}
    out = {}
    for label, row in bench["graphs"][graph].items():
        info = bench.get("models", {}).get(label)
        if info:
            out[(info["role"], info["p0"])] = row["speedup"]
    return out


# ---------------------------------------------------------------------------------------------
# figures


def _tradeoff_axes(ax, run: dict, acc: dict, speed: dict, xlabel: str) -> None:
    for role, style, name in (
        ("uniform", "s--", "uniform SparseGPT"),
        ("searched", "o-", "EfficientLLaVA"),
    ):
        pts = sorted(
            (speed[(role, p0)], acc[(role, p0)], p0)
            for p0 in run["searches"]
            if (role, p0) in speed and (role, p0) in acc
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            for x, y, p0 in pts:
                ax.annotate(
                    f"p0={p0:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    if ("dense", None) in acc:
        ax.plot(
            [speed.get(("dense", None), 1.0)], [acc[("dense", None)]], "k*", ms=10, label="dense"
        )
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("accuracy (test split)")
    ax.set_title("accuracy vs speed: uniform vs EfficientLLaVA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def tradeoff_plot(run: dict, path: Path) -> tuple[str | None, str]:
    """Figure 1: accuracy vs speedup, uniform vs EfficientLLaVA. Returns (path or None, note)."""
    acc = {}
    for p0, s in run["searches"].items():
        a = s["result"].get("accuracy")
        if a:
            acc[("uniform", p0)] = a["uniform"]["accuracy"]
            acc[("searched", p0)] = a["searched"]["accuracy"]
            acc[("dense", None)] = a["dense"]["accuracy"]
    if not acc:
        return None, "no accuracy in the run (see the note above), so no accuracy/speed figure"
    a = analytic_speedups(run)
    analytic = {k: v for k, v in a.items() if isinstance(k, tuple)}
    analytic[("dense", None)] = 1.0
    analytic_label = (
        f"analytic prefill FLOPs speedup (dense / sparse FLOPs, {a['text_tokens']} text tokens "
        "+ 1 image)"
    )
    panels = []
    measured = measured_speedups(run["bench"], "prefill")
    if measured:
        panels.append(
            (
                measured,
                f"CPU speedup over dense (DeepSparse, prefill of {run['bench']['seq_len']} tokens)",
            )
        )
        source = (
            "measured with DeepSparse (bench-cpu/bench.json), left; the analytic FLOPs ceiling, "
            "right. A model whose layers are a few hundred wide runs in microseconds per layer, "
            "where the runtime's overhead, not the arithmetic, sets the time: there the measured "
            "speedup says little and the ceiling is the figure to read"
        )
        panels.append((analytic, analytic_label))
    else:
        panels.append((analytic, analytic_label + "; NOT a CPU timing: bench-cpu did not run"))
        source = "analytic prefill FLOPs (no CPU timing in this run)"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), dpi=120)
    for ax, (speed, xlabel) in zip(np.atleast_1d(axes), panels):
        _tradeoff_axes(ax, run, acc, speed, xlabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path), source


def accuracy_plot(cats: list[str], rows: list[tuple[str, dict]], path: Path) -> str:
    """Grouped bars: one group per category (+ overall), one bar per row of the table."""

    x = np.arange(len(cats) + 1)
    w = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(x) + 4.5), 3.8), dpi=120)
    for k, (name, r) in enumerate(rows):
        vals = [r["per_category"].get(c, np.nan) for c in cats] + [r["accuracy"]]
        ax.bar(x + k * w - 0.4 + w / 2, vals, w, label=name)
    ax.set_xticks(x, cats + ["overall"], rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_title("accuracy by category (test split)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def policy_plot(run: dict, path: Path) -> str:
    """The found per-layer sparsities, one bar group per layer and one bar per p0."""

    ps = list(run["searches"])
    pol = {
        p0: [sum(x) / len(x) if isinstance(x, list) else x for x in s["result"]["policy"]]
        for p0, s in run["searches"].items()
    }
    n = max(len(v) for v in pol.values())
    x = np.arange(n)
    w = 0.8 / len(ps)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n * len(ps) + 2.5), 3.6), dpi=120)
    for k, p0 in enumerate(ps):
        bars = ax.bar(x + k * w - 0.4 + w / 2, pol[p0], w, label=f"searched, p0 = {p0:g}")
        ax.axhline(p0, color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (dashed: uniform p0)")
    ax.set_ylim(0, min(1.0, max(max(v) for v in pol.values()) + 0.2))
    ax.set_title("per-layer sparsity of the found policies")
    ax.legend(fontsize=8, loc="upper right", ncol=len(ps))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------
# markdown


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def accuracy_rows(run: dict) -> tuple[list[str], list[tuple[str, dict]]]:
    """Table 3 shape: (categories, [(row name, evaluate_records result)])."""
    rows = []
    dense = None
    for s in run["searches"].values():
        a = s["result"].get("accuracy")
        if a:
            dense = dense or a["dense"]
    if dense is None and run["dense"] and run["dense"].get("accuracy"):
        dense = run["dense"]["accuracy"]
    if dense:
        rows.append(("dense", dense))
    for p0, s in run["searches"].items():
        a = s["result"].get("accuracy")
        if a:
            rows.append((f"uniform SparseGPT, p0 = {p0:g}", a["uniform"]))
            rows.append((f"EfficientLLaVA, p0 = {p0:g}", a["searched"]))
    fp = run["fitprune"]
    if fp and fp.get("accuracy"):
        rows.append((f"EfficientLLaVA p0 = {fp['p0']:g} + FitPrune", fp["accuracy"]))
    cats = sorted({c for _, r in rows for c in r["per_category"]})
    return cats, rows


def _step_table(manifest: dict) -> list[str]:
    steps = manifest.get("steps") or {}
    if not steps:
        return []
    out = ["| step | status | seconds | note |", "|---|---|---:|---|"]
    for name, s in steps.items():
        if s["status"] == "pending":
            continue
        out.append(
            f"| {name} | {s['status']} | {s['seconds']:.1f} | {s.get('message', '').replace('|', '/')} |"
        )
    return out


def write_report(
    run_dir: str | os.PathLike,
    plots_dir: str | os.PathLike | None = None,
    link_dir: str | None = None,
) -> list[str]:
    """Writes run_dir/report.md and the PNGs (in plots_dir, default run_dir/report/).

    link_dir: how report.md names plots_dir (default: its path relative to run_dir).
    Returns the paths written.
    """
    run = read_run(run_dir)
    d = run["dir"]
    pdir = Path(plots_dir) if plots_dir else d / "report"
    pdir.mkdir(parents=True, exist_ok=True)
    link = link_dir if link_dir is not None else os.path.relpath(pdir, d)
    man = run["manifest"]
    written: list[str] = []

    def img(name: str, alt: str) -> str:
        return f"![{alt}]({link}/{name})"

    md = ["# EfficientLLaVA run report", ""]
    model = man.get("model") or next(iter(run["searches"].values()))["result"].get("model")
    md.append(
        f"Run directory `{d}`; model `{model}`; p0 {', '.join(f'{p:g}' for p in run['searches'])}."
    )
    md.append("")
    if man.get("accuracy_note") or (run["dense"] or {}).get("note"):
        md += [f"**Note:** {man.get('accuracy_note') or run['dense']['note']}", ""]
    steps = _step_table(man)
    if steps:
        md += ["## Steps", ""] + steps + [""]

    # Figure 1
    md += ["## Accuracy vs CPU speedup (the paper's Figure 1)", ""]
    p, source = tradeoff_plot(run, pdir / "tradeoff.png")
    if p:
        written.append(p)
        md += [img("tradeoff.png", "accuracy vs speedup"), "", f"Speedup source: {source}.", ""]
    else:
        md += [source + ".", ""]

    # Table 3
    cats, rows = accuracy_rows(run)
    md += ["## Accuracy by category (the paper's Table 3 shape)", ""]
    if rows:
        md.append("| model | " + " | ".join(cats) + " | overall |")
        md.append("|---|" + "---:|" * (len(cats) + 1))
        for name, r in rows:
            cells = [_pct(r["per_category"].get(c)) for c in cats] + [_pct(r["accuracy"])]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        n = rows[0][1].get("n")
        md += ["", f"Accuracy in percent on the test split ({n} questions)."]
        written.append(accuracy_plot(cats, rows, pdir / "accuracy.png"))
        md += ["", img("accuracy.png", "accuracy by category"), ""]
    else:
        md += ["No accuracy was measured in this run.", ""]

    # CPU timing
    md += ["## CPU timing (DeepSparse)", ""]
    bench = run["bench"]
    bench_step = (man.get("steps") or {}).get("bench-cpu")
    if bench:
        md += [
            f"Engine {bench.get('engine')}, outputs checked against onnxruntime: "
            f"{bench.get('outputs_match')}; sequence length {bench.get('seq_len')}.",
            "",
            "| graph | model | sparsity | median ms | speedup | limit 1/(1-s) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for g, rows_g in bench["graphs"].items():
            for label, r in rows_g.items():
                info = bench.get("models", {}).get(label, {})
                who = info.get("role", label) + (f" p0={info['p0']:g}" if info.get("p0") else "")
                md.append(
                    f"| {g} | {who} | {r['sparsity']:.3f} | {r['median_ms']:.2f} | "
                    f"{r['speedup']:.2f}x | {r['limit']:.2f}x |"
                )
        md.append("")
    elif bench_step and bench_step["status"] == "skipped":
        md += [
            f"Not run: skipped ({bench_step['message']}). The speedups in this report are "
            "analytic (prefill FLOPs), not CPU timings.",
            "",
        ]
    elif bench_step and bench_step["status"] == "failed":
        md += [f"Not available: the step failed: {bench_step['message']}", ""]
    else:
        md += ["No CPU timing in this run directory.", ""]

    # analytic speedups, always (from each model's config and policy)
    a = analytic_speedups(run)
    md += [
        f"Analytic decoder prefill FLOPs speedup (dense / sparse FLOPs, prompt of "
        f"{a['text_tokens']} text tokens + 1 image; the ceiling a sparse kernel could reach):",
        "",
        "| p0 | uniform | EfficientLLaVA |",
        "|---:|---:|---:|",
    ]
    for p0 in run["searches"]:
        if ("uniform", p0) in a:
            md.append(f"| {p0:g} | {a[('uniform', p0)]:.2f}x | {a[('searched', p0)]:.2f}x |")
    md += [
        "",
        "FLOPs are linear in each layer's density and the layers are of equal size, so at the same "
        "mean sparsity uniform and searched policies have the same analytic speedup; only a CPU "
        "timing (bench-cpu) can tell them apart.",
        "",
    ]

    # FitPrune
    fp = run["fitprune"]
    if fp:
        md += [
            f"## FitPrune on top of EfficientLLaVA p0 = {fp['p0']:g}",
            "",
            f"Visual tokens kept per layer (of {fp['visual_tokens']}): {fp['keep']}.",
            f"Decoder prefill FLOPs reduction for a prompt of {fp['reference_prompt']['text_tokens']} "
            f"text tokens + {fp['reference_prompt']['images']} image: tokens alone "
            f"{_pct(fp['flops_reduction_tokens'])}%"
            + (
                f" ({_pct(fp['flops_reduction_visual'])}% of the visual tokens' FLOPs, the "
                "recipe's budget)"
                if "flops_reduction_visual" in fp
                else ""
            )
            + f", weights alone {_pct(fp['flops_reduction_weights'])}%, "
            f"both {_pct(fp['flops_reduction_total'])}%. Recipe fitted in {fp['recipe_seconds']:.1f} s.",
            "",
            (
                f"Accuracy with the recipe: {_pct(fp['accuracy']['accuracy'])}%."
                if fp.get("accuracy")
                else "Accuracy with the recipe: not measured (see the note at the top)."
            ),
            "",
        ]

    def _ratio(x):
        return "-" if x is None else f"{x:.1f}x"

    # per p0: policy, fitness, cost
    md += ["## The searches", ""]
    md += [
        "| p0 | rounds x population | mean sparsity | OBS calls (search / uniform) | search s "
        "| uniform prune s | cost ratio | without compilation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p0, s in run["searches"].items():
        r = s["result"]
        t = r["timings_s"]
        search_s = t.get("database_s", 0) + t.get("search_s", 0) + t.get("final_prune_s", 0)
        st = r.get("settings", {})
        md.append(
            f"| {p0:g} | {st.get('rounds', '?')} x {st.get('population', '?')} | "
            f"{r['mean_sparsity']:.3f} | {r['obs_calls']['search_total']} / "
            f"{r['obs_calls']['uniform_baseline']} | {search_s:.1f} | {t['uniform_prune_s']:.1f} | "
            f"{r['cost_ratio_vs_uniform_prune']:.1f}x | {_ratio(r.get('cost_ratio_excluding_compile'))} |"
        )
    md += [
        "",
        "Seconds include JIT compilation, which the first search of a process pays; cost ratio ="
        " (database + search + final re-prune) / one uniform SparseGPT prune. The uniform prune"
        " reuses what the final re-prune compiled, so the last column, with every phase's"
        " compilation taken out on both sides, is the like-for-like one.",
        "",
        "### Per-layer sparsity of the found policies",
        "",
    ]
    written.append(policy_plot(run, pdir / "policy.png"))
    md += [img("policy.png", "per-layer sparsity"), ""]
    for p0, s in run["searches"].items():
        md.append(f"p0 = {p0:g}: {s['result']['policy']}  ")
    md.append("")
    for p0, s in run["searches"].items():
        if s["rounds"]:
            md += [f"### Best and mean fitness per round, p0 = {p0:g}", ""]
            name = f"fitness-p{p0:g}.png"
            written.append(
                plots.fitness_over_rounds(
                    s["rounds"], str(pdir / name), title=f"search at p0 = {p0:g}"
                )
            )
            md += [img(name, f"fitness p0 {p0:g}"), ""]

    report = d / "report.md"
    tmp = d / ".report.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, report)
    written.append(str(report))
    return written

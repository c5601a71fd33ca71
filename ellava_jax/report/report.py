"""`ellava report DIR`: report.md and its plots from what a demo (or search) run directory holds.

Reads, when present (every number and figure comes from these files, nothing is typed in):

  demo.json                  the demo's manifest (model, p0s, step status and timings, notes)
  dense/result.json          dense accuracy
  search-p<p0>/result.json   policy, accuracy (dense / uniform / searched), OBS calls, timings
  search-p<p0>/rounds.jsonl  best and mean fitness per round
  search-p<p0>/model/config.json   the model's sizes (analytic FLOPs)
  bench-cpu/bench.json       DeepSparse timings (`convert.deepsparse.bench_cpu`)
  fitprune/result.json       the FitPrune recipe on top of a searched model: FLOPs, accuracy

A directory written by `ellava search` alone (result.json at its top) is read as one p0. A
directory written by `benchmarks/real_model.py` (runs.jsonl of pruning methods on a real model)
gets its own table, plot and report (`ellava_jax.report.method_table`).

Writes DIR/report.md and PNGs (by default in DIR/report/):
  tradeoff.png          accuracy vs CPU speedup, uniform vs EfficientLLaVA across p0 (the
                        paper's Figure 1); the speedup is DeepSparse's measured one when
                        bench-cpu ran, else the analytic prefill FLOPs ratio, and the axis says so
  policy.png            per-layer sparsity of the found policies, one bar per p0
  fitness-p<p0>.png     best and mean fitness per round
  accuracy.png          accuracy by category, dense / uniform / searched (+ FitPrune)

`write_report` runs four stages, each callable alone: `read_run` (the files), `collect_tables`
(the numbers the figures and the text share), `draw_figures` (the PNGs, drawn by
`ellava_jax.report.plots`) and `compose_markdown` (the text, one function per section).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import MissingInput
from ellava_jax.eval.flops import by_layer, decoder_prefill_flops, total_flops
from ellava_jax.prune import masks
from ellava_jax.report import method_table, plots

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


def analytic_speedups(run: dict) -> dict[tuple[str, float], float]:
    """(role, p0) -> dense / sparse decoder prefill FLOPs, from each model's config and policy."""

    fp = run["fitprune"] or {}
    text = (fp.get("reference_prompt") or {}).get("text_tokens") or REF_TEXT_TOKENS
    out = {}
    for p0, s in run["searches"].items():
        cfg_path = s["dir"] / "model" / "config.json"
        if not cfg_path.exists():
            continue
        config = LlavaConfig.from_hf_config(str(cfg_path))
        dense = total_flops(decoder_prefill_flops(config, text, 1))
        policy = by_layer(masks.policy_to_sparsities(config, s["result"]["policy"]))
        uni = total_flops(decoder_prefill_flops(config, text, 1, sparsity=float(p0)))
        sea = total_flops(decoder_prefill_flops(config, text, 1, sparsity=policy))
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
# tables: the numbers the figures and the markdown share


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


def tradeoff_points(run: dict, analytic: dict) -> dict:
    """Figure 1's data: {"acc": accuracy per (role, p0), "panels": [(speedup per (role, p0),
    x-axis label)], "note": where the speedups come from, or why there is no figure}.

    The speedup is DeepSparse's measured one (with the analytic ceiling beside it) when
    bench-cpu ran, else the analytic FLOPs ratio alone; without accuracy, acc and panels are empty.
    """
    acc = {}
    for p0, s in run["searches"].items():
        a = s["result"].get("accuracy")
        if a:
            acc[("uniform", p0)] = a["uniform"]["accuracy"]
            acc[("searched", p0)] = a["searched"]["accuracy"]
            acc[("dense", None)] = a["dense"]["accuracy"]
    if not acc:
        note = "no accuracy in the run (see the note above), so no accuracy/speed figure"
        return {"acc": {}, "panels": [], "note": note}
    flops = {k: v for k, v in analytic.items() if isinstance(k, tuple)}
    flops[("dense", None)] = 1.0
    flops_label = (
        f"analytic prefill FLOPs speedup (dense / sparse FLOPs, {analytic['text_tokens']} text "
        "tokens + 1 image)"
    )
    measured = measured_speedups(run["bench"], "prefill")
    if not measured:
        panels = [(flops, flops_label + "; NOT a CPU timing: bench-cpu did not run")]
        return {
            "acc": acc,
            "panels": panels,
            "note": "analytic prefill FLOPs (no CPU timing in this run)",
        }
    measured_label = (
        f"CPU speedup over dense (DeepSparse, prefill of {run['bench']['seq_len']} tokens)"
    )
    note = (
        "measured with DeepSparse (bench-cpu/bench.json), left; the analytic FLOPs ceiling, "
        "right. A model whose layers are a few hundred wide runs in microseconds per layer, "
        "where the runtime's overhead, not the arithmetic, sets the time: there the measured "
        "speedup says little and the ceiling is the figure to read"
    )
    return {"acc": acc, "panels": [(measured, measured_label), (flops, flops_label)], "note": note}


def collect_tables(run: dict) -> dict:
    """{"accuracy": (categories, rows), "analytic": analytic speedups, "tradeoff": Figure 1's data}."""
    analytic = analytic_speedups(run)
    return {
        "accuracy": accuracy_rows(run),
        "analytic": analytic,
        "tradeoff": tradeoff_points(run, analytic),
    }


# ---------------------------------------------------------------------------------------------
# figures


def fitness_png(p0: float) -> str:
    return f"fitness-p{p0:g}.png"


def draw_figures(run: dict, tables: dict, plots_dir: Path) -> dict[str, str]:
    """Draws the report's PNGs into plots_dir; returns {file name: path written}, in the order
    the report shows them (Figure 1 and the accuracy bars only when the run measured accuracy)."""
    out = {}
    t = tables["tradeoff"]
    if t["acc"]:
        out["tradeoff.png"] = plots.tradeoff(
            list(run["searches"]), t["acc"], t["panels"], plots_dir / "tradeoff.png"
        )
    cats, rows = tables["accuracy"]
    if rows:
        out["accuracy.png"] = plots.accuracy_rows_bars(cats, rows, plots_dir / "accuracy.png")
    policies = {p0: s["result"]["policy"] for p0, s in run["searches"].items()}
    out["policy.png"] = plots.policies_bars(policies, plots_dir / "policy.png")
    for p0, s in run["searches"].items():
        if s["rounds"]:
            name = fitness_png(p0)
            out[name] = plots.fitness_over_rounds(
                s["rounds"], str(plots_dir / name), title=f"search at p0 = {p0:g}"
            )
    return out


# ---------------------------------------------------------------------------------------------
# markdown: one function per section, each a list of lines


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _times(x) -> str:
    return "-" if x is None else f"{x:.1f}x"


def _img(link: str, name: str, alt: str) -> str:
    return f"![{alt}]({link}/{name})"


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


def header_section(run: dict) -> list[str]:
    """Title, run directory, model and p0s, the run's note, the steps' table."""
    man = run["manifest"]
    model = man.get("model") or next(iter(run["searches"].values()))["result"].get("model")
    p0s = ", ".join(f"{p:g}" for p in run["searches"])
    md = ["# EfficientLLaVA run report", ""]
    md += [f"Run directory `{run['dir']}`; model `{model}`; p0 {p0s}.", ""]
    if man.get("accuracy_note") or (run["dense"] or {}).get("note"):
        md += [f"**Note:** {man.get('accuracy_note') or run['dense']['note']}", ""]
    steps = _step_table(man)
    if steps:
        md += ["## Steps", ""] + steps + [""]
    return md


def tradeoff_section(tables: dict, figures: dict, link: str) -> list[str]:
    md = ["## Accuracy vs CPU speedup (the paper's Figure 1)", ""]
    note = tables["tradeoff"]["note"]
    if "tradeoff.png" in figures:
        img = _img(link, "tradeoff.png", "accuracy vs speedup")
        return md + [img, "", f"Speedup source: {note}.", ""]
    return md + [note + ".", ""]


def accuracy_section(tables: dict, figures: dict, link: str) -> list[str]:
    """Table 3's shape: accuracy per category, one row per model, and its bar chart."""
    md = ["## Accuracy by category (the paper's Table 3 shape)", ""]
    cats, rows = tables["accuracy"]
    if not rows:
        return md + ["No accuracy was measured in this run.", ""]
    md.append("| model | " + " | ".join(cats) + " | overall |")
    md.append("|---|" + "---:|" * (len(cats) + 1))
    for name, r in rows:
        cells = [_pct(r["per_category"].get(c)) for c in cats] + [_pct(r["accuracy"])]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    n = rows[0][1].get("n")
    md += ["", f"Accuracy in percent on the test split ({n} questions)."]
    if "accuracy.png" in figures:
        md += ["", _img(link, "accuracy.png", "accuracy by category"), ""]
    return md


def bench_section(run: dict) -> list[str]:
    """DeepSparse's timings, or why there are none (the step skipped, failed or absent)."""
    md = ["## CPU timing (DeepSparse)", ""]
    bench = run["bench"]
    bench_step = (run["manifest"].get("steps") or {}).get("bench-cpu")
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
        return md + [""]
    if bench_step and bench_step["status"] == "skipped":
        return md + [
            f"Not run: skipped ({bench_step['message']}). The speedups in this report are "
            "analytic (prefill FLOPs), not CPU timings.",
            "",
        ]
    if bench_step and bench_step["status"] == "failed":
        return md + [f"Not available: the step failed: {bench_step['message']}", ""]
    return md + ["No CPU timing in this run directory.", ""]


def analytic_section(run: dict, tables: dict) -> list[str]:
    """The analytic prefill FLOPs speedups, always (from each model's config and policy)."""
    a = tables["analytic"]
    md = [
        f"Analytic decoder prefill FLOPs speedup (dense / sparse FLOPs, prompt of "
        f"{a['text_tokens']} text tokens + 1 image; the ceiling a sparse kernel could reach):",
        "",
        "| p0 | uniform | EfficientLLaVA |",
        "|---:|---:|---:|",
    ]
    for p0 in run["searches"]:
        if ("uniform", p0) in a:
            md.append(f"| {p0:g} | {a[('uniform', p0)]:.2f}x | {a[('searched', p0)]:.2f}x |")
    return md + [
        "",
        "FLOPs are linear in each layer's density and the layers are of equal size, so at the same "
        "mean sparsity uniform and searched policies have the same analytic speedup; only a CPU "
        "timing (bench-cpu) can tell them apart.",
        "",
    ]


def fitprune_section(run: dict) -> list[str]:
    """The FitPrune recipe on top of a searched model: tokens kept, FLOPs, accuracy."""
    fp = run["fitprune"]
    if not fp:
        return []
    visual = (
        f" ({_pct(fp['flops_reduction_visual'])}% of the visual tokens' FLOPs, the recipe's budget)"
        if "flops_reduction_visual" in fp
        else ""
    )
    prompt = fp["reference_prompt"]
    return [
        f"## FitPrune on top of EfficientLLaVA p0 = {fp['p0']:g}",
        "",
        f"Visual tokens kept per layer (of {fp['visual_tokens']}): {fp['keep']}.",
        f"Decoder prefill FLOPs reduction for a prompt of {prompt['text_tokens']} text tokens + "
        f"{prompt['images']} image: tokens alone {_pct(fp['flops_reduction_tokens'])}%{visual}, "
        f"weights alone {_pct(fp['flops_reduction_weights'])}%, "
        f"both {_pct(fp['flops_reduction_total'])}%. Recipe fitted in {fp['recipe_seconds']:.1f} s.",
        "",
        (
            f"Accuracy with the recipe: {_pct(fp['accuracy']['accuracy'])}%."
            if fp.get("accuracy")
            else "Accuracy with the recipe: not measured (see the note at the top)."
        ),
        "",
    ]


def _search_row(p0: float, r: dict) -> str:
    t = r["timings_s"]
    search_s = t.get("database_s", 0) + t.get("search_s", 0) + t.get("final_prune_s", 0)
    st = r.get("settings", {})
    return (
        f"| {p0:g} | {st.get('rounds', '?')} x {st.get('population', '?')} | "
        f"{r['mean_sparsity']:.3f} | {r['obs_calls']['search_total']} / "
        f"{r['obs_calls']['uniform_baseline']} | {search_s:.1f} | {t['uniform_prune_s']:.1f} | "
        f"{r['cost_ratio_vs_uniform_prune']:.1f}x | {_times(r.get('cost_ratio_excluding_compile'))} |"
    )


def searches_section(run: dict, figures: dict, link: str) -> list[str]:
    """Per p0: the search's cost against a uniform prune, the found policy, fitness per round."""
    md = ["## The searches", ""]
    md += [
        "| p0 | rounds x population | mean sparsity | OBS calls (search / uniform) | search s "
        "| uniform prune s | cost ratio | without compilation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    md += [_search_row(p0, s["result"]) for p0, s in run["searches"].items()]
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
    if "policy.png" in figures:
        md += [_img(link, "policy.png", "per-layer sparsity"), ""]
    md += [f"p0 = {p0:g}: {s['result']['policy']}  " for p0, s in run["searches"].items()]
    md.append("")
    for p0 in run["searches"]:
        name = fitness_png(p0)
        if name in figures:
            md += [f"### Best and mean fitness per round, p0 = {p0:g}", ""]
            md += [_img(link, name, f"fitness p0 {p0:g}"), ""]
    return md


def compose_markdown(run: dict, tables: dict, figures: dict, link: str) -> list[str]:
    """report.md's lines; figures: {file name: path} of the PNGs drawn, which `link` names."""
    return [
        *header_section(run),
        *tradeoff_section(tables, figures, link),
        *accuracy_section(tables, figures, link),
        *bench_section(run),
        *analytic_section(run, tables),
        *fitprune_section(run),
        *searches_section(run, figures, link),
    ]


# ---------------------------------------------------------------------------------------------
# the report


def _write_markdown(run_dir: Path, lines: list[str]) -> str:
    """run_dir/report.md, written atomically (a temporary file, then a rename)."""
    report = run_dir / "report.md"
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, report)
    return str(report)


def write_report(
    run_dir: str | os.PathLike,
    plots_dir: str | os.PathLike | None = None,
    link_dir: str | None = None,
) -> list[str]:
    """Writes run_dir/report.md and the PNGs (in plots_dir, default run_dir/report/).

    link_dir: how report.md names plots_dir (default: its path relative to run_dir).
    Returns the paths written.
    """
    if method_table.is_method_table(run_dir):  # benchmarks/real_model.py's results
        return method_table.write_outputs(run_dir)
    run = read_run(run_dir)
    d = run["dir"]
    pdir = Path(plots_dir) if plots_dir else d / "report"
    pdir.mkdir(parents=True, exist_ok=True)
    link = link_dir if link_dir is not None else os.path.relpath(pdir, d)
    tables = collect_tables(run)
    figures = draw_figures(run, tables, pdir)
    md = compose_markdown(run, tables, figures, link)
    return [*figures.values(), _write_markdown(d, md)]

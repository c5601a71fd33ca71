"""`ellava demo` end to end on the random `tiny` preset: steps, caching by content, the report."""

import json
import re
import time

import pytest

from ellava_jax.app.demo import read_step, run_demo, step_name

# a search small enough for seconds on 2 cores
TINY = dict(
    population=4,
    top_k=2,
    rounds=2,
    projector_steps=1,
    proxy_segments=4,
    proxy_multimodal_samples=2,
    calib_batch_size=4,
)
P0S = (0.4, 0.5)


def _deepsparse_ready() -> bool:
    try:
        from convert import deepsparse
    except ImportError:
        return False
    return hasattr(deepsparse, "bench_cpu") and deepsparse.available()


def _demo(out, lines, **kw):
    kw = dict(overrides=TINY, fitprune_samples=4, progress=False, say=lines.append) | kw
    return run_demo(str(out), "tiny", P0S, **kw)


def test_demo_tiny_runs_caches_and_reports(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    skip = not _deepsparse_ready()
    lines: list[str] = []
    t0 = time.perf_counter()
    assert _demo(out, lines, skip_cpu_bench=skip) == 0, "\n".join(lines)
    first = time.perf_counter() - t0
    steps = ["dense", *[step_name(p) for p in P0S], "fitprune", "report"]
    if not skip:
        steps.append("bench-cpu")
    keys = {}
    for s in steps:
        info = read_step(out / s)
        assert info and info["key"], f"{s} has no step.json"
        keys[s] = info["key"]
    assert not list(out.glob(".*.partial")), "a finished run leaves no partial directory"
    # one start and one end line per step, with elapsed time
    assert any(re.search(r"search-p0\.5: done in [0-9.]+ s", x) for x in lines)

    man = json.loads((out / "demo.json").read_text())
    assert man["has_accuracy"] is False and "tokenizer" in man["accuracy_note"]
    res = json.loads((out / step_name(0.5) / "result.json").read_text())
    assert abs(res["mean_sparsity"] - 0.5) <= 0.01 + 1e-9
    fp = json.loads((out / "fitprune" / "result.json").read_text())
    assert fp["accuracy"] is None and fp["flops_reduction_total"] > fp["flops_reduction_tokens"]

    report = (out / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert pngs, report
    for p in pngs:
        assert (out / p).is_file(), f"report.md references missing {p}"
    assert "tokenizer" in report  # the tiny note
    if skip:
        assert "skipped (--skip-cpu-bench)" in report

    # a second run with the same inputs skips every step
    lines2: list[str] = []
    t0 = time.perf_counter()
    assert _demo(out, lines2, skip_cpu_bench=skip) == 0, "\n".join(lines2)
    second = time.perf_counter() - t0
    man = json.loads((out / "demo.json").read_text())
    for s in steps:
        assert man["steps"][s]["status"] == "cached", (s, man["steps"][s])
        assert read_step(out / s)["key"] == keys[s]
    assert second < first / 2, (first, second)

    # output of a step this run did not make (another p0, earlier settings) stays out of the report
    import shutil

    from ellava_jax.report.report import write_report

    shutil.copytree(out / step_name(0.5), out / step_name(0.3))
    write_report(out)
    assert "p0 = 0.3" not in (out / "report.md").read_text()
    shutil.rmtree(out / step_name(0.3))

    # without --skip-cpu-bench a missing DeepSparse environment skips its step with a line
    # that says how to create it; the other steps stay cached
    monkeypatch.setenv("ELLAVA_DEEPSPARSE_PYTHON", str(tmp_path / "no-such-python"))
    lines3: list[str] = []
    assert _demo(out, lines3, skip_cpu_bench=False) == 0
    man = json.loads((out / "demo.json").read_text())
    bench = man["steps"]["bench-cpu"]
    assert bench["status"] == "skipped" and "setup_deepsparse.sh" in bench["message"]
    assert all(
        man["steps"][s]["status"] == "cached" for s in steps if s not in ("report", "bench-cpu")
    )
    assert "skipped (no DeepSparse environment" in (out / "report.md").read_text()


def test_demo_restarts_a_stale_partial_step(tmp_path):
    """A partial directory left by an interrupted run with other settings is not reused."""
    from ellava_jax.app.demo import Demo

    out = tmp_path / "demo"
    d = Demo(out, "tiny", (0.5,), skip_cpu_bench=True, progress=False, say=lambda m: None)
    partial = out / ".dense.partial"
    partial.mkdir(parents=True)
    (partial / "step.partial.json").write_text(json.dumps({"key": "old"}))
    (partial / "junk").write_text("x")
    d.step("dense", "new-key", lambda p: {"ok": True})
    assert read_step(out / "dense")["key"] == "new-key"
    assert not (out / "dense" / "junk").exists() and not partial.exists()
    # a step that raises (is interrupted) leaves nothing that looks finished
    try:
        d.step("fitprune", "k", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
    except KeyboardInterrupt:
        pass
    assert read_step(out / "fitprune") is None and (out / ".fitprune.partial").exists()


def test_demo_resumes_a_partial_step_with_the_same_key(tmp_path):
    """An interrupted step's partial directory (same key) is handed back to the step: the
    search resumes from the checkpoints it holds there."""
    from ellava_jax.app.demo import Demo

    out = tmp_path / "demo"
    d = Demo(out, "tiny", (0.5,), skip_cpu_bench=True, progress=False, say=lambda m: None)
    partial = out / ".search-p0.5.partial"
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "step.partial.json").write_text(json.dumps({"key": "k"}))
    seen = []
    d.step("search-p0.5", "k", lambda p: seen.append((p / "checkpoints").is_dir()))
    assert seen == [True] and read_step(out / "search-p0.5")["key"] == "k"


@pytest.mark.slow
def test_demo_interrupted_search_resumes(tmp_path, monkeypatch):
    """A search killed after its first round leaves only a partial directory; the next run
    resumes it from its checkpoints and finishes the step (slow: a second tiny search, ~1.5 min
    cold on a loaded 2-core machine)."""
    import ellava_jax.app.search as search_run
    from ellava_jax.search.evolve import SearchInterrupted

    out = tmp_path / "demo"
    real = search_run.run_search

    def killed(*a, **kw):
        return real(*a, stop_after_round=0, **kw)

    monkeypatch.setattr(search_run, "run_search", killed)
    lines: list[str] = []
    with pytest.raises(SearchInterrupted):
        run_demo(
            str(out),
            "tiny",
            (0.5,),
            skip_cpu_bench=True,
            overrides=TINY,
            fitprune_samples=4,
            progress=False,
            say=lines.append,
        )
    partial = out / f".{step_name(0.5)}.partial"
    assert read_step(out / step_name(0.5)) is None and (partial / "checkpoints").is_dir()

    monkeypatch.setattr(search_run, "run_search", real)
    lines = []
    assert _demo_one(out, lines) == 0, "\n".join(lines)
    assert any("resuming an interrupted run" in x for x in lines)
    assert not any("round 1/2" in x for x in lines), "round 1 was redone"
    assert any("round 2/2" in x for x in lines)
    assert read_step(out / step_name(0.5)) and not partial.exists()
    rounds = (out / step_name(0.5) / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == TINY["rounds"]


def _demo_one(out, lines):
    return run_demo(
        str(out),
        "tiny",
        (0.5,),
        skip_cpu_bench=True,
        overrides=TINY,
        fitprune_samples=4,
        progress=False,
        say=lines.append,
    )

"""Runs inside .venv-deepsparse (numpy < 2): check DeepSparse against onnxruntime, then time.

Executed as a script by convert/deepsparse.py, never imported by the library:

    .venv-deepsparse/bin/python convert/deepsparse_runner.py SPEC.json OUT.json

SPEC: {"models": [{"name", "path", "engines": ["deepsparse", "onnxruntime"]}], "inputs": NPZ,
"warmup", "runs", "rounds", "num_cores", "atol", "rtol", "log_dir"}.

For every model, before any timing: one run in onnxruntime and one in DeepSparse on the same
inputs; if any output differs by more than atol + rtol * max|reference| the runner writes
OUT.json with outputs_match false, prints why, and exits 3 without timing anything.
Timing: per round, for each (model, engine): `warmup` untimed runs then `runs` timed runs,
one after the other; the median is over all rounds' timed runs.
DeepSparse's compile log (NM_LOGGING_LEVEL=diagnose) is kept per model and parsed for the share
of the network it runs itself and the number of compiled subgraphs.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

# run as a script from convert/: its own directory must not shadow the real onnx package
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

EXIT_MISMATCH = 3


def _log_summary(text: str) -> dict:
    pct = re.findall(r"supports ([0-9.]+)% of the network", text)
    subgraphs = re.findall(r"Created (\d+) compiled subgraphs", text)
    failures = re.findall(r"FAILED TO COMPILE ====\s*\n?Message: ([^\n]*)", text)
    return {
        "supported_pct": float(pct[-1]) if pct else None,
        "subgraphs": int(subgraphs[-1]) if subgraphs else None,
        "failures": failures,
    }


def _static_copy(path, shapes, work_dir):
    """A copy of the model with the given static input shapes.

    DeepSparse's own input_shapes override rewrites the model file in place; this leaves the
    caller's file alone. Weights stored inline go with the copy into work_dir; a model with
    external data gets a graph-only copy beside it (its data file is found relative to it)."""
    import onnx  # the runner's own environment: imported where used, after its setup

    model = onnx.load(path, load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    for inp, shape in zip(inputs, shapes):
        for d, n in zip(inp.type.tensor_type.shape.dim, shape):
            d.Clear()
            d.dim_value = int(n)
    base = os.path.splitext(os.path.basename(path))[0]
    if external:
        out = os.path.join(os.path.dirname(os.path.abspath(path)), f".{base}.static.onnx")
    else:
        out = os.path.join(work_dir, f"{base}.static.onnx")
    onnx.save(model, out)
    return out


def _compile_deepsparse(path, shapes, batch, context, log_path):
    """Compile with the diagnose log sent to log_path (fd 2 redirected around the compile).

    All engines share one Context (one thread pool): separate engines in one process each keep
    their own worker threads, and those of the engine not running compete with the one timed."""
    from deepsparse import MultiModelEngine  # after main() set DeepSparse's logging level

    path = _static_copy(path, shapes, os.path.dirname(log_path))

    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            t0 = time.perf_counter()
            engine = MultiModelEngine(path, batch_size=batch, context=context)
            dt = time.perf_counter() - t0
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    with open(log_path) as f:
        summary = _log_summary(f.read())
    summary["log"] = log_path
    os.remove(path)  # the compiled engine keeps what it needs
    return engine, dt, summary


def main(spec_path: str, out_path: str) -> int:
    # Over 80 lines on purpose: the runner's whole job in its own environment, step by step.
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("NM_LOGGING_LEVEL", "diagnose")
    # imported after the logging level is set (DeepSparse reads it at import)
    import deepsparse
    import numpy as np
    import onnx
    import onnxruntime as ort

    if int(np.__version__.split(".")[0]) >= 2:
        print(
            f"numpy {np.__version__} in the DeepSparse environment: DeepSparse 1.8 needs numpy<2",
            file=sys.stderr,
        )
        return 2

    data = np.load(spec["inputs"])
    num_cores = spec.get("num_cores")
    atol, rtol = float(spec.get("atol", 1e-3)), float(spec.get("rtol", 1e-3))
    log_dir = spec.get("log_dir") or os.path.dirname(os.path.abspath(out_path))
    result = {
        "versions": {
            "deepsparse": deepsparse.__version__,
            "numpy": np.__version__,
            "onnxruntime": ort.__version__,
        },
        "num_cores": num_cores,
        "outputs_match": None,
        "models": {},
    }

    def write():
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    context = deepsparse.Context(num_cores=num_cores or None, num_streams=1)
    runners = []  # (model name, engine name, callable)
    for m in spec["models"]:
        name, path = m["name"], m["path"]
        names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
        feeds = [np.ascontiguousarray(data[n]) for n in names]
        shapes = [list(x.shape) for x in feeds]
        so = ort.SessionOptions()
        if num_cores:
            so.intra_op_num_threads = int(num_cores)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        t0 = time.perf_counter()
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ort_compile = time.perf_counter() - t0
        ref = sess.run(None, dict(zip(names, feeds)))
        out_names = [o.name for o in sess.get_outputs()]
        engine, ds_compile, summary = _compile_deepsparse(
            path, shapes, shapes[0][0], context, os.path.join(log_dir, f"deepsparse_{name}.log")
        )
        got = engine.run(feeds)
        diffs, ok = {}, True
        for on, r, g in zip(out_names, ref, got):
            err = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            bad = (g.shape != r.shape) or not np.isfinite(err) or err > atol + rtol * scale
            diffs[on] = {"max_abs_diff": err, "max_abs_ref": scale, "ok": not bad}
            ok &= not bad
        result["models"][name] = {
            "path": path,
            "outputs": diffs,
            "outputs_match": ok,
            "deepsparse_compile": summary,
            "compile_s": {"deepsparse": ds_compile, "onnxruntime": ort_compile},
            "engines": {},
        }
        if not ok:
            result["outputs_match"] = False
            write()
            worst = max(diffs.items(), key=lambda kv: kv[1]["max_abs_diff"])
            print(
                f"REFUSING TO REPORT: DeepSparse and onnxruntime outputs differ for model {name!r}: "
                f"output {worst[0]!r} max abs diff {worst[1]['max_abs_diff']:.3g} (reference max "
                f"{worst[1]['max_abs_ref']:.3g}, tolerance atol={atol} + rtol={rtol} * max)",
                file=sys.stderr,
            )
            return EXIT_MISMATCH
        engines = m.get("engines", ["deepsparse", "onnxruntime"])
        if "deepsparse" in engines:
            runners.append((name, "deepsparse", lambda e=engine, f=feeds: e.run(f, val_inp=False)))
        else:
            del engine
        if "onnxruntime" in engines:
            feed = dict(zip(names, feeds))
            runners.append((name, "onnxruntime", lambda s=sess, f=feed: s.run(None, f)))
        else:
            del sess
    result["outputs_match"] = True
    write()

    times = {(n, e): [] for n, e, _ in runners}
    for _ in range(int(spec.get("rounds", 1))):
        for n, e, fn in runners:
            for _ in range(int(spec.get("warmup", 2))):
                fn()
            for _ in range(int(spec.get("runs", 5))):
                t0 = time.perf_counter()
                fn()
                times[(n, e)].append((time.perf_counter() - t0) * 1e3)
    for (n, e), ts in times.items():
        result["models"][n]["engines"][e] = {
            "median_ms": float(np.median(ts)),
            "min_ms": float(np.min(ts)),
            "times_ms": ts,
            "runs_per_round": int(spec.get("runs", 5)),
        }
    write()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))

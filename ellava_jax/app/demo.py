"""`ellava demo`: the whole journey on one model, as steps cached by content, then the report.

Steps (each writes one directory under the run directory):

  dense/            dense accuracy on the model's test split (toy), by category
  search-p<p0>/     per p0: the EfficientLLaVA search (`run_search`, which also writes the
                    uniform SparseGPT baseline in uniform/), with accuracy of both
  bench-cpu/        ONNX export + DeepSparse timing of dense, uniform and searched models
                    (`convert.deepsparse.bench_cpu`); `--skip-cpu-bench` leaves it out
  fitprune/         a FitPrune recipe on top of the p0 = 0.5 searched model, its accuracy and FLOPs
  report/           report.md and its plots (`ellava_jax.report.report.write_report`)

Caching: a step's directory holds `step.json` with a content key, the hash of the step's
settings, the model's config and weight file hashes, and the keys of the steps it depends on.
A step whose key matches is skipped. A step runs in `.<name>.partial/` and is renamed into
place only when finished, so an interrupted step never looks finished; the search resumes from
the checkpoints in its partial directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from convert import deepsparse
from ellava_jax.app import search as app_search
from ellava_jax.app.models import load_config, load_model, resolve_model_dir
from ellava_jax.app.sources import eval_records, fitprune_calibration
from ellava_jax.config import get_preset
from ellava_jax.data import prompt as T
from ellava_jax.errors import MissingInput, UserError
from ellava_jax.eval.flops import by_layer, flops_reduction
from ellava_jax.eval.harness import evaluate_records
from ellava_jax.prune.masks import policy_to_sparsities
from ellava_jax.report.report import write_report
from ellava_jax.search.settings import load_settings, shipped_recipes
from ellava_jax.tokens import recipe_last_logits
from ellava_jax.tokens.fit import fit_recipe

STEP_FORMAT = "ellava-jax/demo-step/1"
DEFAULT_P0 = (0.3, 0.4, 0.5)
FITPRUNE_P0 = 0.5
TINY_NOTE = (
    "the `tiny` preset is random and has no tokenizer: accuracy is not measured "
    "(run the demo on `toy` or an HF directory for accuracy)"
)


class StepFailed(RuntimeError):
    """A step could not run; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# content keys


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def model_fingerprint(spec: str, seed: int = 0) -> dict:
    """What identifies a model's content: config + weight file hashes (or the tiny preset)."""

    d = resolve_model_dir(spec)
    if d is None:
        return {"preset": "tiny", "config": get_preset("tiny").to_hf_config(), "seed": seed}
    files = sorted(
        p for p in Path(d).iterdir() if p.name == "config.json" or p.suffix == ".safetensors"
    )
    return {"dir": os.path.abspath(d), "files": {p.name: _sha256_file(p) for p in files}}


def content_key(name: str, settings: dict, model: dict, deps: list[str]) -> str:
    blob = json.dumps(
        {"format": STEP_FORMAT, "step": name, "settings": settings, "model": model, "deps": deps},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_json(path: Path, obj) -> None:
    """Atomic: a temp file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_step(directory: Path) -> dict | None:
    p = Path(directory) / "step.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------------
# settings


def search_settings(model: str, p0: float, overrides: dict | None = None):
    """The search recipe for one p0, from the recipes shipped with the package (configs/):
    toy-p0X (toy), tiny (tiny), or toy with p0 replaced; then `model` and `overrides`."""
    shipped = shipped_recipes()
    if "toy" not in shipped or "tiny" not in shipped:
        raise UserError(
            "the shipped search recipes (configs/*.yaml) are missing from this install; "
            "reinstall ellava-jax"
        )
    tag = f"toy-p0{round(p0 * 10)}"
    if model == "tiny":
        path = shipped["tiny"]
    elif abs(p0 * 10 - round(p0 * 10)) < 1e-9 and tag in shipped:
        path = shipped[tag]
    else:
        path = shipped["toy"]
    s = load_settings(path, p0=p0, model=model)
    return s.replace(**(overrides or {}))


def step_name(p0: float) -> str:
    return f"search-p{p0:g}"


# ---------------------------------------------------------------------------------------------
# the runner


@dataclasses.dataclass
class StepRecord:
    name: str
    key: str | None = None
    status: str = "pending"  # done | cached | failed | skipped
    seconds: float = 0.0
    message: str = ""


class Demo:
    def __init__(
        self,
        out: str | os.PathLike,
        model: str = "toy",
        p0s=DEFAULT_P0,
        *,
        skip_cpu_bench: bool = False,
        overrides: dict | None = None,
        bench_seq_len: int = 64,
        fitprune_reduction: float = 0.5,
        fitprune_samples: int = 32,
        eval_limit: int | None = None,
        progress: bool = True,
        say: Callable[[str], None] = print,
    ):
        self.out = Path(out)
        self.model = model
        self.p0s = tuple(float(p) for p in p0s)
        if not self.p0s:
            raise UserError("--p0: give at least one target sparsity")
        for p in self.p0s:
            if not 0.0 < p < 1.0:
                raise UserError(f"--p0 {p}: a target sparsity must lie in (0, 1)")
        self.skip_cpu_bench = skip_cpu_bench
        self.overrides = dict(overrides or {})
        self.bench_seq_len = bench_seq_len
        self.fitprune_reduction = fitprune_reduction
        self.fitprune_samples = fitprune_samples
        self.eval_limit = eval_limit
        self.progress = progress
        self._say = say
        self.t0 = time.perf_counter()
        self.records: dict[str, StepRecord] = {}
        self.has_accuracy = model != "tiny"
        self._dense_eval = None  # (fingerprint of dense params, result)

    # -- output -------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        self._say(f"[demo {time.perf_counter() - self.t0:7.1f} s] {msg}")

    def _manifest(self) -> dict:
        return {
            "format": "ellava-jax/demo/1",
            "model": self.model,
            "p0": list(self.p0s),
            "fitprune_p0": self.fitprune_p0,
            "skip_cpu_bench": self.skip_cpu_bench,
            "has_accuracy": self.has_accuracy,
            "accuracy_note": None if self.has_accuracy else TINY_NOTE,
            "overrides": self.overrides,
            "steps": {k: dataclasses.asdict(v) for k, v in self.records.items()},
        }

    def write_manifest(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "demo.json", self._manifest())

    @property
    def fitprune_p0(self) -> float:
        return FITPRUNE_P0 if FITPRUNE_P0 in self.p0s else max(self.p0s)

    # -- one step -----------------------------------------------------------------------------

    def step(self, name: str, key: str, fn: Callable[[Path], dict | None]) -> StepRecord:
        """Runs fn(partial_dir) unless `name`'s step.json has `key`; renames into place."""
        rec = self.records.setdefault(name, StepRecord(name))
        rec.key = key
        final = self.out / name
        done = read_step(final)
        if done and done.get("key") == key:
            rec.status, rec.seconds = "cached", 0.0
            rec.message = f"finished earlier in {done.get('seconds', 0):.1f} s"
            self.say(f"{name}: cached (same content key), skipped")
            return rec
        partial = self.out / f".{name}.partial"
        marker = partial / "step.partial.json"
        if partial.exists():
            old = json.loads(marker.read_text()).get("key") if marker.exists() else None
            if old != key:
                shutil.rmtree(partial)
            else:
                self.say(f"{name}: resuming an interrupted run")
        partial.mkdir(parents=True, exist_ok=True)
        _write_json(marker, {"key": key, "step": name})
        self.say(f"{name}: start")
        t = time.perf_counter()
        try:
            info = fn(partial) or {}
        except (StepFailed, ModuleNotFoundError) as e:
            if isinstance(e, ModuleNotFoundError):
                e = StepFailed(
                    f"a component this step needs is missing from this install: module "
                    f"{e.name!r} ({e})"
                )
            rec.status, rec.message = "failed", str(e)
            rec.seconds = time.perf_counter() - t
            shutil.rmtree(partial, ignore_errors=True)
            self.say(f"{name}: FAILED after {rec.seconds:.1f} s: {e}")
            self.write_manifest()
            return rec
        rec.seconds = time.perf_counter() - t
        _write_json(
            partial / "step.json",
            {"format": STEP_FORMAT, "step": name, "key": key, "seconds": rec.seconds} | info,
        )
        marker.unlink()
        if final.exists():
            stale = self.out / f".{name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
        rec.status = "done"
        self.say(f"{name}: done in {rec.seconds:.1f} s")
        self.write_manifest()
        return rec

    def skip(self, name: str, why: str) -> None:
        self.records[name] = StepRecord(name, status="skipped", message=why)
        self.say(f"{name}: skipped ({why})")

    # -- evaluation ---------------------------------------------------------------------------

    def _evaluator(self):
        """evaluate(config, params) on the toy test split (or None for tiny); dense results are
        reused across steps (recognised by a hash of the parameters)."""
        if not self.has_accuracy:
            return None

        model_dir = resolve_model_dir(self.model)
        tok = T.load_tokenizer(model_dir)
        records, path = eval_records(None, self.eval_limit)

        def evaluate(config, params, logits_fn=None):
            fp = _params_hash(params)
            if logits_fn is None and self._dense_eval and self._dense_eval[0] == fp:
                return self._dense_eval[1]
            return evaluate_records(
                config,
                params,
                tok,
                records,
                jsonl_path=path,
                model_dir=model_dir,
                progress=self.progress,
                logits_fn=logits_fn,
            )

        return evaluate

    # -- the steps ----------------------------------------------------------------------------

    def run(self) -> int:

        # Over 80 lines on purpose: the journey's five steps read in order, each a few lines.
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"model {self.model}, p0 {', '.join(f'{p:g}' for p in self.p0s)}, out {self.out}")
        try:
            model_fp = model_fingerprint(self.model)
        except FileNotFoundError as e:
            raise MissingInput(
                f"{e} (`--model tiny` runs the demo's whole path on the random tiny preset, "
                "without accuracy)"
            ) from None
        evaluate = self._evaluator()
        self.write_manifest()

        # 1. dense evaluation
        eval_settings = {"data": "toy-test", "scoring": "generate", "limit": self.eval_limit}
        dense_key = content_key("dense", eval_settings, model_fp, [])

        def dense(d: Path):
            if evaluate is None:
                res = {"accuracy": None, "note": TINY_NOTE, "model": self.model}
            else:
                config, params, model_dir = load_model(self.model)
                res = {"accuracy": evaluate(config, params), "model": model_dir}
            _write_json(d / "result.json", res)

        self.step("dense", dense_key, dense)
        if evaluate is not None and self.records["dense"].status != "failed":
            config, params, _ = load_model(self.model)
            acc = json.loads((self.out / "dense" / "result.json").read_text())["accuracy"]
            self._dense_eval = (_params_hash(params), acc)
            del params

        # 2. the search (and the uniform baseline) per p0
        search_keys = {}
        for p0 in self.p0s:
            s = search_settings(self.model, p0, self.overrides)
            name = step_name(p0)
            key = content_key(name, dataclasses.asdict(s), model_fp, [dense_key])
            search_keys[p0] = key

            def search(d: Path, s=s):
                # looked up per call, not imported at the top: tests stand in for it
                r = app_search.run_search(
                    s, str(d), evaluate=evaluate, progress=self.progress, say=self.say
                )
                return {"p0": s.p0, "mean_sparsity": r["mean_sparsity"]}

            self.step(name, key, search)

        searched_ok = [p for p in self.p0s if self.records[step_name(p)].status != "failed"]

        # 3. export + DeepSparse timing
        bench_settings = {"seq_len": self.bench_seq_len, "graphs": ["prefill", "decode"]}
        bench_key = content_key(
            "bench-cpu", bench_settings, model_fp, [search_keys[p] for p in self.p0s]
        )
        if self.skip_cpu_bench:
            self.skip("bench-cpu", "--skip-cpu-bench")
        elif not deepsparse.available():
            self.skip("bench-cpu", f"no DeepSparse environment: {deepsparse.setup_hint()}")
        elif len(searched_ok) < len(self.p0s):
            self.skip("bench-cpu", "a search step failed")
        else:
            self.step("bench-cpu", bench_key, lambda d: self._bench(d, bench_settings))

        # 4. FitPrune on top of the p0 = 0.5 searched model
        fp_p0 = self.fitprune_p0
        fp_settings = {
            "p0": fp_p0,
            "flops_reduction": self.fitprune_reduction,
            "samples": self.fitprune_samples,
        }
        fp_key = content_key("fitprune", fp_settings, model_fp, [search_keys[fp_p0]])
        if fp_p0 in searched_ok:
            self.step("fitprune", fp_key, lambda d: self._fitprune(d, fp_p0, evaluate))
        else:
            self.skip("fitprune", f"the p0 = {fp_p0:g} search failed")

        # 5. the report
        # the report depends on what each step wrote: its step.json (key and run time, so a
        # re-executed step, e.g. a new CPU timing, refreshes the report) or why it is missing
        deps = [
            json.dumps(read_step(self.out / k), sort_keys=True)
            if _outcome(self.records[k].status) == "ok"
            else f"{k}:{self.records[k].status}"
            for k in sorted(self.records)
        ]
        report_key = content_key("report", {"skip_cpu_bench": self.skip_cpu_bench}, model_fp, deps)
        self.write_manifest()
        self.step("report", report_key, self._report)
        self.write_manifest()
        failed = [r.name for r in self.records.values() if r.status == "failed"]
        total = time.perf_counter() - self.t0
        if failed:
            self.say(f"finished in {total:.1f} s; FAILED steps: {', '.join(failed)}")
            for n in failed:
                self.say(f"  {n}: {self.records[n].message}")
            return 1
        self.say(f"finished in {total:.1f} s; report: {self.out / 'report.md'}")
        return 0

    def _bench(self, d: Path, bench_settings: dict) -> dict:

        models, roles = [self.model], [{"role": "dense", "p0": None}]
        for p0 in self.p0s:
            for sub, role in (("uniform", "uniform"), ("model", "searched")):
                models.append(str(self.out / step_name(p0) / sub))
                roles.append({"role": role, "p0": p0})
        try:
            res = deepsparse.bench_cpu(
                models,
                load=load_model,
                load_config=load_config,
                seq_len=bench_settings["seq_len"],
                workdir=d / "onnx",
            )
        except Exception as e:  # mismatch, runner crash: the message is the report
            raise StepFailed(f"{type(e).__name__}: {e}") from None
        shutil.rmtree(d / "onnx", ignore_errors=True)
        res["models"] = {
            f"{i}:{Path(m).name or m}": dict(roles[i], path=m) for i, m in enumerate(models)
        }
        _write_json(d / "bench.json", res)
        return {"engine": res.get("engine"), "outputs_match": res.get("outputs_match")}

    def _fitprune(self, d: Path, p0: float, evaluate) -> dict:

        model_dir = str(self.out / step_name(p0) / "model")
        config, params, _ = load_model(model_dir)
        cal_dir = None if self.model == "tiny" else model_dir
        cal = fitprune_calibration(config, cal_dir, self.fitprune_samples, 0, None)
        recipe = fit_recipe(config, params, cal, self.fitprune_reduction)
        recipe.save(d / "recipe.json")
        search = json.loads((self.out / step_name(p0) / "result.json").read_text())
        sparsity = by_layer(policy_to_sparsities(config, search["policy"]))
        tt, im = recipe.text_tokens, recipe.images
        res = {
            "p0": p0,
            "keep": list(recipe.keep),
            "visual_tokens": config.num_image_tokens,
            "reference_prompt": {"text_tokens": tt, "images": im},
            "flops_reduction_tokens": flops_reduction(config, tt, im, keep=recipe.keep),
            "flops_reduction_visual": recipe.flops_reduction,
            "flops_reduction_weights": flops_reduction(config, tt, im, sparsity=sparsity),
            "flops_reduction_total": flops_reduction(
                config, tt, im, keep=recipe.keep, sparsity=sparsity
            ),
            "recipe_seconds": recipe.seconds,
            "accuracy": None,
        }
        if evaluate is None:
            res["note"] = TINY_NOTE
        else:
            res["accuracy"] = evaluate(config, params, logits_fn=recipe_last_logits(recipe))
        _write_json(d / "result.json", res)
        return {"flops_reduction_total": res["flops_reduction_total"]}

    def _report(self, d: Path) -> dict:

        self.write_manifest()
        paths = write_report(self.out, plots_dir=d, link_dir="report")
        # report.md sits at the top of the run directory; its plots in report/
        return {"files": [os.path.relpath(p, d) for p in paths]}


def _outcome(status: str) -> str:
    return "ok" if status in ("done", "cached") else status


def _params_hash(params) -> str:

    h = hashlib.sha1()
    for x in jax.tree_util.tree_leaves(params):
        h.update(np.asarray(x).tobytes())
    return h.hexdigest()


def run_demo(out: str, model: str = "toy", p0s=DEFAULT_P0, **kw) -> int:
    """Runs the demo into `out`; returns 0, or 1 when a step failed (the report says which)."""
    try:
        return Demo(out, model, p0s, **kw).run()
    except StepFailed as e:
        print(f"demo: {e}")
        traceback.print_exc()
        return 1

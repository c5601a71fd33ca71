"""`ellava search` and `ellava eval` on a plain LLaMA causal LM (a text-only config): the search
on the text proxy alone (no projector step, no projector/ written), its uniform and OWL rows,
resume, held-out perplexity and multiple choice on records without images, and the refusals
(images for a text-only model, a multimodal proxy, the toy's test split)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from convert.hf import save_hf_llava
from ellava_jax.app.search import run_search
from ellava_jax.cli import main
from ellava_jax.config import LlavaConfig, get_preset
from ellava_jax.data.records import Record, write_records
from ellava_jax.model import init_params
from ellava_jax.search.evolve import SearchInterrupted
from ellava_jax.search.settings import load_settings
from ellava_jax.toy.defaults import model_dir as toy_dir

# population 4, proxy 4 x 16 tokens, 2 rounds: seconds, most of it compiling
RECIPE = """\
p0: 0.5
population: 4
rounds: 2
top_k: 2
neighbors: 1
eta: 0.5
proxy_segments: 4
proxy_seq_len: 16
seed: 0
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM directory (the `tiny-llama` preset, its vocabulary made
    to hold the toy's word-level tokenizer, copied along), a proxy text of its words, records
    without images and a recipe."""
    root = tmp_path_factory.mktemp("llama")
    text = dataclasses.replace(get_preset("tiny-llama").text, vocab_size=288)
    config = LlavaConfig.text_only(text)
    model = str(root / "model")
    save_hf_llava(model, config, init_params(config, jax.random.key(0)), copy_from=toy_dir())
    with open(os.path.join(model, "tokenizer.json")) as f:
        words = [w for w in json.load(f)["model"]["vocab"] if w.isalpha()]
    rng = np.random.default_rng(0)
    proxy = root / "proxy.txt"
    proxy.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(40)) + "\n")
    records = root / "records.jsonl"
    write_records(
        records,
        [
            Record(
                question=" ".join(rng.choice(words, 5)),
                choices=[str(w) for w in rng.choice(words, 3, replace=False)],
                answer=i % 3,
                category=("a", "b")[i % 2],
                context=" ".join(rng.choice(words, 4)) if i == 0 else None,
            )
            for i in range(5)
        ],
    )
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {model}\nproxy_text: {proxy}\n{RECIPE}")
    return {"dir": model, "proxy": str(proxy), "records": str(records), "recipe": str(recipe)}


@pytest.fixture(scope="module")
def searched(llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("search") / "run")
    args = ["search", "--config", llama["recipe"], "--out", out, "--json"]
    assert main([*args, "--set", f"eval_data={llama['records']}"]) == 0
    return out


def _linear_sparsity(directory: str) -> float:
    from safetensors.numpy import load_file

    w = load_file(os.path.join(directory, "model.safetensors"))
    lin = [v for k, v in w.items() if k.endswith("proj.weight")]
    return float(sum((x == 0).sum() for x in lin) / sum(x.size for x in lin))


def test_search_on_a_text_only_llama(searched, llama):
    with open(os.path.join(searched, "result.json")) as f:
        res = json.load(f)
    assert len(res["policy"]) == 2 and all(0.4 - 1e-9 <= p <= 0.6 + 1e-9 for p in res["policy"])
    assert abs(res["mean_sparsity"] - 0.5) <= 0.01 + 1e-9
    assert abs(res["measured_sparsity"] - 0.5) < 0.02
    assert res["obs_calls"] == {
        "database": 70,  # 5 levels x 14 matrices
        "final_reprune": 14,
        "search_total": 84,
        "uniform_baseline": 14,
    }
    # the default evaluator: multiple choice on the records (no images) for all three rows
    assert set(res["accuracy"]) == {"dense", "uniform", "searched"}
    assert all(a["n"] == 5 and 0 <= a["accuracy"] <= 1 for a in res["accuracy"].values())
    # no projector: nothing trained, c_m still computed and logged, no projector/ written
    with open(os.path.join(searched, "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
    assert len(rounds) == 2
    for r in rounds:
        assert r["projector_loss_first"] is None and r["projector_loss_last"] is None
        assert len(r["c_m"]) == 2 and abs(sum(r["c_m"]) - 1) < 1e-6
    assert not os.path.exists(os.path.join(searched, "projector"))
    for d in ("model", "uniform", "checkpoint", "masks.npz"):
        assert os.path.exists(os.path.join(searched, d)), d


def test_the_searched_model_loads_in_transformers(searched):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")

    model_dir = os.path.join(searched, "model")
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 11]])).logits
    assert logits.shape == (1, 4, 288) and torch.isfinite(logits).all()
    assert abs(_linear_sparsity(model_dir) - 0.5) < 0.02


@pytest.mark.parametrize("ablation", ["uniform", "owl"])
def test_uniform_and_owl_rows(llama, tmp_path, capsys, ablation):
    out = str(tmp_path / ablation)
    args = ["search", "--config", llama["recipe"], "--out", out, "--ablation", ablation]
    assert main([*args, "--no-eval", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["obs_calls"]["database"] == 0 and summary["obs_calls"]["final_reprune"] == 14
    if ablation == "uniform":
        assert summary["policy"] == [0.5, 0.5]
    else:  # OWL's continuous layer sparsities, mean p0
        assert summary["policy"] != [0.5, 0.5] and abs(np.mean(summary["policy"]) - 0.5) < 1e-6
    assert not os.path.exists(os.path.join(out, "projector"))
    assert abs(_linear_sparsity(os.path.join(out, "model")) - 0.5) < 0.02


def test_a_killed_text_only_search_resumes_to_the_same_policy(llama, searched, tmp_path):
    """The round checkpoints hold no projector; a resumed search ends where an unbroken one
    did (the CLI run above, without evaluation)."""
    settings = load_settings(llama["recipe"])
    out = str(tmp_path / "run")
    with pytest.raises(SearchInterrupted):
        run_search(settings, out, stop_after_round=0, progress=False, say=lambda *_: None)
    # an evaluator of held-out perplexity (benchmarks/real_model.py's): no per-category plot
    res = run_search(
        settings,
        out,
        evaluate=lambda config, params: {"perplexity": 1.0},
        progress=False,
        say=lambda *_: None,
    )
    with open(os.path.join(searched, "result.json")) as f:
        whole = json.load(f)
    assert res["policy"] == whole["policy"] and res["best_fitness"] == whole["best_fitness"]
    assert res["accuracy"]["searched"] == {"perplexity": 1.0}
    assert not os.path.exists(os.path.join(out, "accuracy.png"))


def test_a_multimodal_proxy_is_refused(llama, tmp_path, capsys):
    mm = tmp_path / "mm.jsonl"
    mm.write_text('{"image": "a.png", "text": "x"}\n')
    args = ["search", "--config", llama["recipe"], "--out", str(tmp_path / "run"), "--no-eval"]
    assert main([*args, "--set", f"proxy_multimodal={mm}"]) == 2
    err = capsys.readouterr().err
    assert "proxy_multimodal" in err and "text-only" in err


def test_eval_perplexity_and_text_multiple_choice(llama, capsys):
    args = ["eval", "--model", llama["dir"], "--json"]
    assert main([*args, "--data", "none", "--heldout", llama["proxy"], "--seq-len", "16"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    h = res["heldout"]
    assert h["seq_len"] == 16 and h["windows"] >= 1 and np.isfinite(h["perplexity"])
    assert h["perplexity"] > 1
    for scoring in ("generate", "likelihood"):
        assert main([*args, "--data", llama["records"], "--scoring", scoring]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["n"] == 5 and 0 <= res["accuracy"] <= 1 and res["scoring"] == scoring
        assert res["decoder_prefill_flops"] is None  # no image prompt


def test_eval_refuses_images_on_a_text_only_model(llama, tmp_path, capsys):
    recs = tmp_path / "with_image.jsonl"
    lines = open(llama["records"]).read().splitlines()
    row = json.loads(lines[1]) | {"image": "picture.png"}
    recs.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    assert main(["eval", "--model", llama["dir"], "--data", str(recs)]) == 2
    err = capsys.readouterr().err
    assert f"{recs}:2:" in err and "text-only" in err
    # the default data is the toy's test split (images), a token recipe prunes visual tokens
    assert main(["eval", "--model", llama["dir"]]) == 2
    assert "text-only" in capsys.readouterr().err
    recipe = tmp_path / "recipe.json"
    recipe.write_text("{}")
    args = ["eval", "--model", llama["dir"], "--data", llama["records"]]
    assert main([*args, "--token-recipe", str(recipe)]) == 2
    assert "no visual tokens" in capsys.readouterr().err

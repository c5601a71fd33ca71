"""OWL layer sparsities (ellava_jax.prune.owl) against llm-compressor's
`_infer_owl_layer_sparsity` on the same model and calibration tokens, and `ellava prune
--allocation owl`.

llm-compressor gathers its activation norms with a forward-pre hook on every Linear: each
calibration batch adds its L2 norm over (batch, tokens) divided by a fixed 128. OWL's outlier
ratio is unchanged by a factor common to a layer, not by per-batch sums of norms, so the
first comparison hands our function norms gathered the same way (from our own dense
calibration pass, batch by batch); with a single batch, its norms are proportional to
sqrt(diag H), and the second comparison runs our production path unchanged.

Only the inferred sparsities are compared: in llm-compressor 0.14, `on_calibration_start`
hands OWL's dict on as one sparsity for every module (its `case _:`), so its end-to-end OWL
pruning does not run as intended.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert.hf import load_hf_llava
from ellava_jax.cli import main
from ellava_jax.commands import prune as prune_command
from ellava_jax.errors import UserError
from ellava_jax.model.llama import layer_params
from ellava_jax.prune import owl
from ellava_jax.prune.hessian import GROUPS, MATRIX_GROUP, build_calibration_set, calibrate
from ellava_jax.prune.masks import MATRICES, get_kernel, get_path, kernel_path
from tests.conftest import hf_model, tiny_config

torch = pytest.importorskip("torch")

P0, M, LAM = 0.7, 5, 0.08
N_LAYERS, ROWS, T, PER_BATCH = 6, 12, 24, 4
# the Linear whose input llm-compressor's hook records, for each of our input groups
HOOKED = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj"}
HOOKED |= {"mlp_in": "mlp.gate_proj", "down_in": "mlp.down_proj"}


def _llmc_owl(model, loader):
    """llm-compressor's OWL sparsities (one per decoder layer, in order) and its activation
    norms, on the HF model's decoder layers, in a session of its own."""
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.core import create_session
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    # the sequential targets on_initialize would find; text-only batches never run the
    # vision tower, so only the decoder layers are OWL's layers here
    layers = {
        name: mod
        for name, mod in match_named_modules(model, infer_sequential_targets(model))
        if ".language_model.layers." in name
    }
    assert len(layers) == N_LAYERS
    mod = SparseGPTModifier(sparsity=P0, sparsity_profile="owl", owl_m=M, owl_lmbda=LAM)
    with create_session() as session:
        session.initialize(model=model, recipe=[])
        got = mod._infer_owl_layer_sparsity(model, layers, loader)
        acts = mod._get_activations(model, loader)
    order = sorted(got, key=lambda name: int(name.rsplit(".", 1)[1]))
    return [float(got[k]) for k in order], {k: v.numpy() for k, v in acts.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaVA whose LLaMA has 6 layers with a few amplified norm channels each (so the
    layers' outlier ratios differ), as HF torch and as our params; calibration tokens."""
    config = tiny_config(text_num_hidden_layers=N_LAYERS)
    model = hf_model(config, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, layer in zip((3, 1, 5, 2, 6, 4), model.model.language_model.layers):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                idx = torch.randperm(norm.weight.numel(), generator=gen)[:k]
                norm.weight[idx] *= 4.0 + 8.0 * torch.rand(k, generator=gen)
    path = tmp_path_factory.mktemp("owl") / "hf"
    model.save_pretrained(path)
    cfg, params = load_hf_llava(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.image_token_index, (ROWS, T))
    mask = np.ones_like(ids)
    return model, cfg, params, ids, mask


def _loader(ids, mask, per_batch):
    return [
        {
            "input_ids": torch.tensor(ids[s : s + per_batch]),
            "attention_mask": torch.tensor(mask[s : s + per_batch]),
        }
        for s in range(0, len(ids), per_batch)
    ]


def _norms_its_way(cfg, params, ids, mask, per_batch):
    """Per layer {group: sum over batches of the batch's ||X_j||_2 / 128}, from our own dense
    calibration pass run batch by batch (H = (2/n) X^T X, so ||X_j||^2 = diag(H) n / 2)."""
    acc = [dict.fromkeys(GROUPS, 0.0) for _ in range(cfg.text.num_hidden_layers)]
    for s in range(0, len(ids), per_batch):
        b_ids, b_mask = ids[s : s + per_batch], mask[s : s + per_batch]
        calib = build_calibration_set(cfg, params, [(b_ids, b_mask, None)], batch_size=per_batch)
        n = calib.n_samples

        def on_layer(i, _lp, hess, n=n):
            for g, h in hess.items():
                acc[i][g] = acc[i][g] + np.sqrt(np.diag(np.asarray(h, np.float64)) * n / 2) / 128

        calibrate(cfg, params, calib, on_layer, mode="dense", batch_size=per_batch, progress=False)
    return [{g: v.astype(np.float32) for g, v in layer.items()} for layer in acc]


def test_matches_llm_compressor_with_its_activation_norms(setup):
    model, cfg, params, ids, mask = setup
    ref, acts = _llmc_owl(model, _loader(ids, mask, PER_BATCH))
    norms = _norms_its_way(cfg, params, ids, mask, PER_BATCH)
    # the norms themselves: ours (JAX forward) against its hooks (torch forward)
    for i in range(N_LAYERS):
        for g, name in HOOKED.items():
            np.testing.assert_allclose(
                norms[i][g], acts[f"model.language_model.layers.{i}.{name}"], rtol=1e-4
            )
    ours = owl.owl_layer_sparsities(cfg, params, None, P0, M, LAM, input_norms=norms)
    # and the sparsities from the torch norms themselves: the ratio and rescaling alone
    torch_norms = [
        {g: acts[f"model.language_model.layers.{i}.{name}"] for g, name in HOOKED.items()}
        for i in range(N_LAYERS)
    ]
    ours_torch = owl.owl_layer_sparsities(cfg, params, None, P0, M, LAM, input_norms=torch_norms)
    print("llm-compressor", np.round(ref, 6), "ours", np.round(ours, 6))
    assert len(set(np.round(ref, 6))) == N_LAYERS  # the layers really differ
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_torch, ref, atol=1e-5, rtol=0)


def test_production_path_matches_llm_compressor_on_one_batch(setup):
    """One calibration batch: its norms are ||X_j|| / 128, ours sqrt(diag H) from the
    Hessians of one dense pass (chunked 5 at a time: chunking does not change H)."""
    model, cfg, params, ids, mask = setup
    ref, _ = _llmc_owl(model, _loader(ids, mask, ROWS))
    calib = build_calibration_set(cfg, params, [(ids, mask, None)])
    ours = owl.owl_layer_sparsities(cfg, params, calib, P0, M, LAM, batch_size=5, progress=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.mean(ours) == pytest.approx(P0, abs=1e-12)
    assert max(ours) - min(ours) == pytest.approx(2 * LAM, abs=1e-12)


def test_rescaling_and_ratio_invariants(setup):
    _, cfg, params, *_ = setup
    # a higher outlier ratio gets a lower sparsity; the mean is p0, the span 2 lambda
    s = owl.owl_from_ratios([0.5, 2.0, 1.0, 0.2], 0.6, 0.1)
    assert np.argsort(s).tolist() == [1, 2, 0, 3]
    assert np.mean(s) == pytest.approx(0.6) and max(s) - min(s) == pytest.approx(0.2)
    assert owl.owl_from_ratios([1.0, 1.0, 1.0], 0.5) == [0.5] * 3  # no spread: uniform
    assert owl.owl_from_ratios([0.0, 3.0], 0.5, 0.0) == [0.5, 0.5]
    with pytest.raises(UserError, match="layer 3 the sparsity -0.0700"):
        owl.owl_from_ratios([0.0, 0.0, 0.0, 1.0], 0.05, 0.08)  # 0.05 - (0.16 - 0.04) < 0
    with pytest.raises(UserError, match="lambda"):
        owl.owl_from_ratios([0.0, 1.0], 0.5, -0.1)
    # a factor common to the layer leaves its ratio unchanged; one group's factor does not
    lp = layer_params(params, 0)
    rng = np.random.default_rng(1)
    norms = {
        g: rng.gamma(1.0, size=get_path(lp, kernel_path(0, GROUPS[g][0])[3:]).shape[0]).astype(
            np.float32
        )
        for g in GROUPS
    }
    r = owl.layer_outlier_ratio(lp, norms, 3.0)
    assert 0 < r < 100
    assert owl.layer_outlier_ratio(lp, {g: 2.0 * v for g, v in norms.items()}, 3.0) == r
    assert owl.layer_outlier_ratio(lp, norms | {"o_in": 50.0 * norms["o_in"]}, 3.0) != r
    # the ratio by hand, numpy, over the seven matrices together
    z = np.concatenate(
        [
            (
                np.abs(np.asarray(get_path(lp, kernel_path(0, m)[3:])))
                * norms[MATRIX_GROUP[m]][:, None]
            ).ravel()
            for m in MATRICES
        ]
    )
    assert r == pytest.approx(100 * np.mean(z > 3.0 * z.mean()), abs=1e-9)
    assert (prune_command.OWL_M, prune_command.OWL_LAMBDA) == (owl.DEFAULT_M, owl.DEFAULT_LAMBDA)


@pytest.mark.slow  # SparseGPT on the toy (about 30 s); test_prune_tiny_llama_owl is the CLI's
def test_prune_cli_owl_on_the_toy(tmp_path, capsys):
    out = tmp_path / "owl"
    argv = ["prune", "--model", "toy", "--allocation", "owl", "--sparsity", "0.7"]
    assert main([*argv, "--method", "sparsegpt", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "sparsity.json").read_text())
    o = rep["owl"]
    sp = np.array(o["layer_sparsities"])
    print(printed.splitlines()[0])
    assert rep["allocation"] == "owl" and (o["p0"], o["m"], o["lambda"]) == (0.7, 5.0, 0.08)
    assert "OWL layer sparsities" in printed and f"{sp[0]:.4f}" in printed
    n = len(sp)
    assert len(o["outlier_ratios"]) == n == 4
    # every layer has the same size: the parameter-weighted mean is the plain mean
    assert sp.mean() == pytest.approx(0.7, abs=1e-9)
    assert sp.max() - sp.min() == pytest.approx(0.16, abs=1e-9)
    assert np.all(np.abs(sp - 0.7) <= 2 * 0.08 * (1 - 1 / n) + 1e-9)
    assert np.argmin(sp) == np.argmax(o["outlier_ratios"])
    # what was pruned: each layer at its sparsity, the measured mean at p0
    assert abs(o["measured_mean_sparsity"] - 0.7) < 0.005
    assert o["measured_mean_sparsity"] == rep["sparsity"]["overall"]
    for i, row in enumerate(rep["sparsity"]["layers"]):
        assert abs(row["layer"] - sp[i]) < 0.005, i
    _, params = load_hf_llava(out)
    w = np.asarray(get_kernel(params, 3, "mlp.down_proj"))
    assert abs(np.mean(w == 0) - sp[3]) < 0.005


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--allocation", "owl", "--policy", "POLICY"], "drop --policy"),
        (["--allocation", "owl", "--nm", "2:4"], "drop --nm"),
        (["--owl-m", "4"], "--owl-m apply only with --allocation owl"),
        (["--allocation", "owl", "--owl-lambda", "0.6"], "--owl-lambda 0.6"),
        (["--allocation", "owl", "--owl-m", "0"], "--owl-m 0"),
        (["--allocation", "owl", "--sparsity", "1.2"], "--sparsity 1.2"),
    ],
)
def test_prune_cli_owl_refusals(tmp_path, capsys, extra, message):
    policy = tmp_path / "policy.json"
    policy.write_text("[0.5, 0.5]")
    extra = [str(policy) if x == "POLICY" else x for x in extra]
    out = tmp_path / "out"
    assert main(["prune", "--model", "tiny", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_search_owl_ablation_is_the_owl_row(tmp_path, capsys):
    """`ellava search --ablation owl`: no search; OWL's continuous layer sparsities (mean p0,
    spread 2 lambda) on the search's own calibration data, pruned by SparseGPT."""
    import json

    from ellava_jax.cli import main

    out = tmp_path / "owl"
    argv = ["search", "--config", "configs/tiny.yaml", "--ablation", "owl", "--out", str(out)]
    assert main([*argv, "--no-eval"]) == 0
    res = json.loads((out / "result.json").read_text())
    policy = res["policy"]
    assert res["settings"]["baseline"] == "owl" and res["policy_levels"] is None
    assert res["obs_calls"]["database"] == 0
    assert abs(sum(policy) / len(policy) - 0.5) < 1e-6  # tiny: every layer the same size
    assert abs(max(policy) - min(policy) - 2 * 0.08) < 1e-6
    assert abs(res["measured_sparsity"] - res["mean_sparsity"]) < 0.005
    assert "OWL layer sparsities" in capsys.readouterr().out

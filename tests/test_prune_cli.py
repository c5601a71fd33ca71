"""`ellava prune`: HF-format output that transformers loads, masks, summary, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convert.hf import load_hf_llava
from ellava_jax.cli import main
from ellava_jax.prune.masks import MATRICES, get_kernel, get_path, kernel_path, load_masks


def _zeros(params, layer, m):
    return float(np.mean(np.asarray(get_kernel(params, layer, m)) == 0))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_prune_writes_a_loadable_model_masks_and_summary(tmp_path, method):
    out = tmp_path / "out"
    args = [
        "prune",
        "--model",
        "tiny",
        "--method",
        method,
        "--sparsity",
        "0.5",
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    cfg, params = load_hf_llava(out)
    for layer in range(cfg.text.num_hidden_layers):
        for m in MATRICES:
            assert abs(_zeros(params, layer, m) - 0.5) < 0.01, (layer, m)
    masks = load_masks(str(out / "masks.npz"))
    k = kernel_path(1, "mlp.down_proj")
    np.testing.assert_array_equal(
        np.asarray(get_path(masks, k)), np.asarray(get_kernel(params, 1, "mlp.down_proj")) != 0
    )
    rep = json.loads((out / "sparsity.json").read_text())
    assert rep["method"] == method and abs(rep["sparsity"]["overall"] - 0.5) < 0.01
    assert rep["pruner_calls"] == 7 * cfg.text.num_hidden_layers
    import transformers

    transformers.LlavaForConditionalGeneration.from_pretrained(out)


def test_policy_and_nm(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"policy": [0.3, 0.7]}))
    out = tmp_path / "pol"
    assert (
        main(
            [
                "prune",
                "--model",
                "tiny",
                "--policy",
                str(policy),
                "--nsamples",
                "8",
                "--seqlen",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _, params = load_hf_llava(out)
    assert (
        abs(_zeros(params, 0, "mlp.up_proj") - 0.3) < 0.01
        and abs(_zeros(params, 1, "mlp.up_proj") - 0.7) < 0.01
    )
    out = tmp_path / "nm"
    assert (
        main(
            [
                "prune",
                "--model",
                "tiny",
                "--nm",
                "2:4",
                "--nsamples",
                "8",
                "--seqlen",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _, params = load_hf_llava(out)
    w = np.asarray(get_kernel(params, 0, "self_attn.o_proj"))  # [in, out]
    groups = (w.reshape(-1, 4, w.shape[1]) == 0).sum(1)  # 4 consecutive inputs per output
    assert (groups >= 2).all()


def test_bad_input_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "p.json"
    bad.write_text("[0.5, 0.5, 0.5]")
    assert main(["prune", "--model", "tiny", "--policy", str(bad), "--out", str(out)]) == 2
    assert "3 entries, the model has 2 decoder layers" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    assert main(["prune", "--model", "tiny", "--nm", "2-4", "--out", str(out)]) == 2
    assert main(["prune", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert not out.exists()

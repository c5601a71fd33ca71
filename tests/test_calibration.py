"""Calibration Hessians against the inputs the HF (PyTorch) model feeds its own linears."""

from __future__ import annotations

import numpy as np
import pytest

from convert.hf import load_hf_llava, save_hf_llava
from ellava_jax.prune.hessian import GROUPS, build_calibration_set, calibrate
from tests.conftest import hf_model, prompt_batch, tiny_config

torch = pytest.importorskip("torch")

HOOKED = {
    "attn_in": "self_attn.q_proj",
    "o_in": "self_attn.o_proj",
    "mlp_in": "mlp.gate_proj",
    "down_in": "mlp.down_proj",
}


def _hf_hessians(model, ids, mask, pix):
    """(2/n) sum over real tokens of x x^T for each hooked linear, from forward hooks."""
    grams, handles = {}, []
    lm = model.model.language_model
    keep = torch.tensor(mask, dtype=torch.bool)
    for i, layer in enumerate(lm.layers):
        for g, name in HOOKED.items():
            mod = layer.get_submodule(name)

            def hook(_m, inp, _out, key=(i, g)):
                x = inp[0][keep].double()  # [n_tokens, d]
                grams[key] = grams.get(key, 0) + x.T @ x

            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=None if pix is None else torch.tensor(pix),
        )
    for h in handles:
        h.remove()
    n = int(np.any(mask > 0, axis=1).sum())
    return {k: (2.0 / n) * v.numpy() for k, v in grams.items()}


@pytest.mark.parametrize("batch_size", [8, 3])
def test_dense_hessians_match_hf_hooks(tmp_path, batch_size):
    config = tiny_config()
    model = hf_model(config, seed=11)
    model.save_pretrained(tmp_path / "m")
    cfg, params = load_hf_llava(tmp_path / "m")
    ids, mask, pix = prompt_batch(
        config, images_per_row=(1, 0, 2, 1, 0), pad=(3, 0, 1, 5, 2), seed=12
    )
    calib = build_calibration_set(cfg, params, [(ids, mask, pix)], batch_size=batch_size)
    got = {}

    def on_layer(i, lp, hess):
        for g, h in hess.items():
            got[(i, g)] = np.asarray(h)

    calibrate(cfg, params, calib, on_layer, mode="dense", batch_size=batch_size, progress=False)
    ref = _hf_hessians(model, ids, mask, pix)
    assert (
        set(got) == set(ref) == {(i, g) for i in range(cfg.text.num_hidden_layers) for g in GROUPS}
    )
    for k in ref:
        scale = np.abs(ref[k]).max()
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5 * scale, rtol=0, err_msg=str(k))


def test_sequential_mode_feeds_pruned_outputs_forward(tmp_path):
    """Layer 1's Hessians in sequential mode are those of the model whose layer 0 is pruned."""
    config = tiny_config()
    model = hf_model(config, seed=13)
    model.save_pretrained(tmp_path / "m")
    cfg, params = load_hf_llava(tmp_path / "m")
    ids, mask, pix = prompt_batch(config, images_per_row=(1, 1), pad=(2, 0), seed=14)
    calib = build_calibration_set(cfg, params, [(ids, mask, pix)])
    got = {}

    def zero_half_of_layer0(i, lp, hess):
        for g, h in hess.items():
            got[(i, g)] = np.asarray(h)
        if i != 0:
            return None
        mlp = dict(lp["mlp"])
        k = np.asarray(mlp["down_proj"]["kernel"]).copy()
        k[: k.shape[0] // 2] = 0
        mlp["down_proj"] = {"kernel": k}
        return dict(lp, mlp=mlp)

    pruned = calibrate(cfg, params, calib, zero_half_of_layer0, mode="sequential", progress=False)
    save_hf_llava(tmp_path / "p", cfg, pruned)
    import transformers

    ref = _hf_hessians(
        transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "p"), ids, mask, pix
    )
    dense_ref = _hf_hessians(model, ids, mask, pix)
    for g in GROUPS:
        np.testing.assert_allclose(got[(1, g)], ref[(1, g)], atol=2e-5 * np.abs(ref[(1, g)]).max())
    assert not np.allclose(ref[(1, "attn_in")], dense_ref[(1, "attn_in")], atol=1e-3)

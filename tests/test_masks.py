"""Mask trees, policies -> per-matrix sparsities, summaries, mask files."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ellava_jax.model import init_params
from ellava_jax.prune.masks import (
    MATRICES,
    apply_masks,
    decoder_linears,
    get_kernel,
    kernel_path,
    load_masks,
    masks_from_params,
    mean_sparsity,
    policy_to_sparsities,
    save_masks,
    sparsity_summary,
)


def _random_masks(config, params, rate, seed=0):
    rng = np.random.default_rng(seed)
    masks = {}
    from ellava_jax.prune.masks import set_path

    for layer, m in decoder_linears(config):
        shape = get_kernel(params, layer, m).shape  # a mask tree names layers one by one
        masks = set_path(masks, kernel_path(layer, m), rng.random(shape) >= rate)
    return masks


def test_apply_summary_and_file_round_trip(tiny, tmp_path):
    params = init_params(tiny, jax.random.key(0))
    masks = _random_masks(tiny, params, 0.3)
    pruned = apply_masks(params, masks)
    # only the masked kernels change; the rest of the tree is the same arrays
    assert pruned["vision_tower"] is params["vision_tower"]
    summary = sparsity_summary(tiny, pruned)
    assert abs(summary["overall"] - 0.3) < 0.02
    assert len(summary["layers"]) == tiny.text.num_hidden_layers
    back = masks_from_params(tiny, pruned)
    for path_leaf in jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(
            lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), back, masks
        )
    ):
        assert path_leaf
    save_masks(tmp_path / "m.npz", masks)
    loaded = load_masks(str(tmp_path / "m.npz"))
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(masks)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_policy_forms(tiny):
    n = tiny.text.num_hidden_layers
    uni = policy_to_sparsities(tiny, 0.5)
    assert set(uni) == set(decoder_linears(tiny)) and set(uni.values()) == {0.5}
    per_layer = policy_to_sparsities(tiny, [0.4, 0.6])
    assert per_layer[(0, "mlp.up_proj")] == 0.4 and per_layer[(1, "self_attn.q_proj")] == 0.6
    assert abs(mean_sparsity(tiny, per_layer) - 0.5) < 1e-9  # equal-size layers
    per_matrix = policy_to_sparsities(tiny, [[0.1 * (j % 5) for j in range(len(MATRICES))]] * n)
    assert per_matrix[(1, "mlp.gate_proj")] == pytest.approx(0.4)
    as_dict = policy_to_sparsities(
        tiny, {f"{layer}.{m}": 0.2 for layer, m in decoder_linears(tiny)}
    )
    assert set(as_dict.values()) == {0.2}


@pytest.mark.parametrize(
    "policy, msg",
    [
        ([0.5], "1 entries, the model has 2"),
        ([0.5, 1.2], "outside"),
        ([[0.5] * 3, 0.5], "expected 7"),
        ({"0.mlp.up_proj": 0.5}, "no sparsity for"),
    ],
)
def test_bad_policies_name_the_problem(tiny, policy, msg):
    with pytest.raises(ValueError, match=msg):
        policy_to_sparsities(tiny, policy)

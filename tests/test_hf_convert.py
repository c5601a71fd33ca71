"""HF directory <-> Flax params: bitwise round trips, key layouts, sharding, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.hf import CheckpointError, _canonical_key, load_hf_llava, save_hf_llava
from ellava_jax.config import ConfigError
from tests.conftest import hf_model, tiny_config

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    hf_model(tiny_config(), seed=3).save_pretrained(d)
    return d


def _tensors(d, canonical=False) -> dict[str, np.ndarray]:
    """All tensors of a directory; with canonical, keys in the hub layout (transformers 5 writes
    `vision_tower.*` where the hub has `vision_tower.vision_model.*`)."""
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return {_canonical_key(k): v for k, v in out.items()} if canonical else out


def test_round_trip_hf_flax_hf_is_bitwise(hf_dir, tmp_path):
    config, params = load_hf_llava(hf_dir)
    save_hf_llava(tmp_path / "out", config, params)
    a, b = _tensors(hf_dir, canonical=True), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_saved_directory_loads_in_transformers_without_missing_keys(hf_dir, tmp_path):
    import transformers

    config, params = load_hf_llava(hf_dir)
    save_hf_llava(tmp_path / "out", config, params)
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_bfloat16_round_trip_is_bitwise(tmp_path):
    model = hf_model(tiny_config(), seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    config, params = load_hf_llava(tmp_path / "bf16")
    assert str(params["lm_head"]["kernel"].dtype) == "bfloat16"
    save_hf_llava(tmp_path / "out", config, params)
    from safetensors.torch import load_file as load_torch

    a = load_torch(tmp_path / "bf16" / "model.safetensors")
    a = {_canonical_key(k): v for k, v in a.items()}
    b = load_torch(tmp_path / "out" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_checkpoint_with_index(hf_dir, tmp_path):
    config, params = load_hf_llava(hf_dir)
    save_hf_llava(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    _, back = load_hf_llava(tmp_path / "sharded")
    np.testing.assert_array_equal(back["lm_head"]["kernel"], params["lm_head"]["kernel"])
    import transformers

    transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "sharded")


def test_in_memory_key_layout_and_flat_vision_tower(hf_dir, tmp_path):
    """transformers 5's module names (model.language_model.*, lm_head.*, model.vision_tower.*
    without vision_model.) read the same as the hub layout."""
    shutil.copytree(hf_dir, tmp_path / "new")
    sd = _tensors(hf_dir)
    renamed = {}
    for k, v in sd.items():
        k2 = k.replace("language_model.model.", "model.language_model.")
        k2 = k2.replace("language_model.lm_head.", "lm_head.")
        k2 = k2.replace("vision_tower.vision_model.", "model.vision_tower.")
        k2 = (
            k2.replace("vision_tower.", "model.vision_tower.")
            if not k2.startswith("model.")
            else k2
        )
        k2 = (
            k2.replace("multi_modal_projector.", "model.multi_modal_projector.")
            if k2.startswith("multi")
            else k2
        )
        renamed[k2] = v
    assert any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, str(tmp_path / "new" / "model.safetensors"), metadata={"format": "pt"})
    _, a = load_hf_llava(hf_dir)
    _, b = load_hf_llava(tmp_path / "new")
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the key.


def _copy_with(hf_dir, tmp_path, mutate):
    d = tmp_path / "bad"
    shutil.copytree(hf_dir, d)
    sd = _tensors(d)
    mutate(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_llava(tmp_path / "nowhere")


def test_missing_tensor_names_it(hf_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    d = _copy_with(hf_dir, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"bad.*missing tensor '{key}'"):
        load_hf_llava(d)


def test_extra_tensor_names_it(hf_dir, tmp_path):
    d = _copy_with(
        hf_dir,
        tmp_path,
        lambda sd: sd.update(
            {"language_model.model.layers.9.extra.weight": np.zeros(3, np.float32)}
        ),
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: unexpected tensor 'language_model\.model\.layers\.9\.extra\.weight'",
    ):
        load_hf_llava(d)


def test_shape_mismatch_names_key_and_shapes(hf_dir, tmp_path):
    key = "multi_modal_projector.linear_2.weight"
    d = _copy_with(hf_dir, tmp_path, lambda sd: sd.update({key: sd[key][:, :-1].copy()}))
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors: tensor '{key}' has shape \(64, 63\)"
    ):
        load_hf_llava(d)


def test_non_llava_config_json(hf_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())["text_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"bad/config\.json: model_type='llama'"):
        load_hf_llava(d)


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(hf_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors"):
        load_hf_llava(d)


def test_index_naming_a_missing_shard(hf_dir, tmp_path):
    config, params = load_hf_llava(hf_dir)
    save_hf_llava(tmp_path / "sh", config, params, max_shard_bytes=40_000)
    shard = sorted(f for f in os.listdir(tmp_path / "sh") if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / "sh" / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_hf_llava(tmp_path / "sh")


def test_failed_save_leaves_existing_directory_intact(hf_dir, tmp_path):
    config, params = load_hf_llava(hf_dir)
    out = tmp_path / "out"
    save_hf_llava(out, config, params)
    before = (out / "model.safetensors").read_bytes()
    broken = dict(params)
    broken.pop("lm_head")
    with pytest.raises(CheckpointError, match="missing"):
        save_hf_llava(out, config, broken)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []

"""The search on a device mesh: axis parsing, what each array is split on, and results that do
not depend on the mesh (8 forced CPU devices, in a subprocess: the device count is fixed when
a process starts its backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from ellava_jax.errors import UserError
from ellava_jax.mesh import kernel_spec, make_mesh, mesh_notes, parse_mesh
from ellava_jax.search.settings import SearchSettings, SettingError
from tests.conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


class _Shape:
    """Stands in for a mesh where only its axis sizes are read."""

    def __init__(self, **shape):
        self.shape = shape


def test_mesh_axes_parse_and_bad_ones_are_named():
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("model=8") == {"data": 1, "model": 8}
    assert parse_mesh(None) is None
    with pytest.raises(UserError, match="mesh axis 'tensor': expected one of data, model"):
        parse_mesh("tensor=2")
    with pytest.raises(UserError, match="mesh axis data='x': expected a positive integer"):
        parse_mesh("data=x")
    with pytest.raises(UserError, match=r"mesh 'data2': expected axis=size pairs"):
        parse_mesh("data2")
    with pytest.raises(
        UserError, match=r"mesh data=2,model=4 needs 8 devices; this process sees 1"
    ):
        make_mesh("data=2,model=4")
    with pytest.raises(SettingError, match=r"search setting mesh='data=0': mesh axis data=0"):
        SearchSettings(mesh="data=0")
    assert make_mesh(None).shape == {"data": 1, "model": 1}  # one device: all on data


def test_weights_split_by_whole_heads_or_are_replicated_with_a_line():
    """Column-parallel q/k/v/gate/up, row-parallel o/down; the toy's 2 KV heads do not divide
    over 4 model devices: k and v are replicated, and a line says so."""
    from ellava_jax.app.models import load_config

    toy = load_config("toy")
    assert (toy.text.num_attention_heads, toy.text.num_key_value_heads) == (4, 2)
    mesh = _Shape(data=2, model=4)
    assert kernel_spec(toy, "self_attn.q_proj", 3, mesh) == P(None, None, "model")
    assert kernel_spec(toy, "mlp.down_proj", 3, mesh) == P(None, "model", None)
    assert kernel_spec(toy, "mlp.up_proj", 4, mesh) == P(None, None, None, "model")
    assert kernel_spec(toy, "self_attn.k_proj", 3, mesh) == P()
    assert mesh_notes(toy, mesh) == [
        "self_attn.k_proj: 2 KV heads do not divide over model=4: replicated",
        "self_attn.v_proj: 2 KV heads do not divide over model=4: replicated",
    ]
    assert mesh_notes(toy, _Shape(data=4, model=2)) == []


def _run8(code: str, timeout=900) -> dict:
    """Runs `code` with 8 forced CPU devices; its last stdout line is JSON."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fitness_and_projector_on_a_mesh_equal_one_device():
    """On a data=2 x model=4 mesh (weights and level stacks split, candidates over data) the
    population's J and the trained projector equal the one-device ones."""
    res = _run8(
        """
        import json, jax, numpy as np
        from ellava_jax.config import get_preset
        from ellava_jax.mesh import make_mesh, shard_kernels, shard_params
        from ellava_jax.model import init_params
        from ellava_jax.prune.database import build_database
        from ellava_jax.prune.hessian import build_calibration_set
        from ellava_jax.search.fitness import fitness
        from ellava_jax.search.policy import PolicySpace
        from ellava_jax.search.projector import importance_weights, train_projector
        from ellava_jax.search.proxy_batches import FitnessBatches
        from ellava_jax.search.proxy_sources import random_proxy
        from ellava_jax.search.settings import SearchSettings

        config = get_preset("tiny")
        params = init_params(config, jax.random.key(0))
        s = SearchSettings(model="tiny", population=8, top_k=4, proxy_segments=6,
                           proxy_seq_len=24, proxy_multimodal_samples=3)
        proxy = random_proxy(config, 6, 24, 3)
        calib = build_calibration_set(config, params, proxy.calibration_batches())
        space = PolicySpace(config, 0.5, "layer")
        db = build_database(config, params, calib, space.levels, progress=False)
        fb = FitnessBatches(config, params, proxy, s)
        idx = space.random(8, np.random.default_rng(1))
        parts = fb.parts(params["multi_modal_projector"])
        c = importance_weights(idx[:4], 3)

        def run(p, streaming):
            j = fitness(config, p, db, space, idx, parts, 0.5, streaming=streaming)[0]
            proj, _ = train_projector(config, p, db, space, idx[:4], c, fb.training, steps=2,
                                      lr=1e-3, mass=1.0, streaming=streaming)
            return np.asarray(j), np.asarray(proj["linear_1"]["kernel"])

        ref = run(params, False)
        mesh = make_mesh("data=2,model=4")
        out = {}
        with jax.set_mesh(mesh):
            sp = shard_params(config, params, mesh)
            q = sp["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
            out["q_spec"] = str(q.sharding.spec)
            db.place = lambda st: shard_kernels(config, st, mesh)
            for streaming in (False, True):
                j, k = run(sp, streaming)
                out[f"j_{streaming}"] = float(np.abs(j - ref[0]).max() / np.abs(ref[0]).max())
                out[f"p_{streaming}"] = float(np.abs(k - ref[1]).max())
        print(json.dumps(out))
        """
    )
    assert res["q_spec"] == "P(None, None, 'model')"
    for streaming in ("False", "True"):
        assert res[f"j_{streaming}"] <= 1e-5 and res[f"p_{streaming}"] <= 1e-5, res


@pytest.mark.slow
def test_toy_search_on_8_devices_gives_the_one_device_policy(tmp_path):
    """The toy search (2 rounds) on data=2 x model=4 finds the one-device policy and best J
    (1e-4 relative); killed after its first round there, it resumes on data=8."""
    code = f"""
        import json
        from ellava_jax.app.search import run_search
        from ellava_jax.search.settings import load_settings
        s = load_settings("configs/toy.yaml").replace(rounds=2)
        out = {{}}
        try:
            run_search(s.replace(mesh="data=2,model=4"), "{tmp_path}/mesh", stop_after_round=0,
                       progress=False, say=lambda *a: None)
        except Exception as e:
            out["stopped"] = type(e).__name__
        r = run_search(s.replace(mesh="data=8"), "{tmp_path}/mesh", progress=False,
                       say=lambda *a: None)
        out.update(policy=r["policy"], j=r["best_fitness"])
        print(json.dumps(out))
        """
    res = _run8(code, timeout=1800)
    from ellava_jax.app.search import run_search
    from ellava_jax.search.settings import load_settings

    one = run_search(
        load_settings("configs/toy.yaml").replace(rounds=2),
        str(tmp_path / "one"),
        progress=False,
        say=lambda *a: None,
    )
    assert res["stopped"] == "SearchInterrupted"
    assert res["policy"] == one["policy"]
    assert abs(res["j"] - one["best_fitness"]) <= 1e-4 * abs(one["best_fitness"])


@pytest.mark.slow
def test_prune_on_8_devices_gives_the_one_device_masks(tmp_path):
    """`ellava prune --method sparsegpt --mesh data=2,model=4` on the toy: the masks agree with
    the one-device prune's on >= 99.99% of entries."""
    import numpy as np

    from ellava_jax.cli import main
    from ellava_jax.prune.masks import load_masks

    args = ["prune", "--model", "toy", "--method", "sparsegpt", "--sparsity", "0.5"]
    _run8(
        f"""
        import json
        from ellava_jax.cli import main
        assert main({args!r} + ["--mesh", "data=2,model=4", "--out", "{tmp_path}/mesh"]) == 0
        print(json.dumps({{}}))
        """
    )
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    import jax

    a, b = (load_masks(str(tmp_path / d / "masks.npz")) for d in ("mesh", "one"))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    pairs = [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    same = sum(int((x == y).sum()) for x, y in pairs)
    total = sum(x.size for x, _ in pairs)
    assert same / total >= 0.9999, same / total

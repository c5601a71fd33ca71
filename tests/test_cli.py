"""The `ellava` command line: sub-commands run and bad input is one clear line."""

from __future__ import annotations

import json

from ellava_jax.cli import main


def test_check_tiny_json(capsys):
    assert main(["check", "--model", "tiny", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["logits_finite"] and summary["parameters"] > 0
    assert len(summary["generated"]) == 8


def test_convert_round_trip_and_missing_model(tmp_path, capsys):
    assert main(["convert", "--model", "tiny", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "config.json").exists()
    assert main(["check", "--model", str(tmp_path / "t"), "--json"]) == 0
    assert main(["check", "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such model directory" in capsys.readouterr().err


def test_export_and_bench_cpu_on_tiny(tmp_path, capsys):
    """Export a pruned tiny model, then time it against dense; the JSON names the engine and
    says the outputs were checked. (Timings on tiny shapes say nothing; the test checks the path.)"""
    import os

    import pytest

    if not os.path.exists(".venv-deepsparse/bin/python"):
        pytest.skip("no .venv-deepsparse (bash scripts/setup_deepsparse.sh creates it)")
    pruned = tmp_path / "p"
    assert (
        main(
            [
                "prune",
                "--model",
                "tiny",
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--out",
                str(pruned),
            ]
        )
        == 0
    )
    assert main(["export", "--model", str(pruned), "--out", str(tmp_path / "onnx")]) == 0
    assert {"decoder_prefill.onnx", "decoder_decode.onnx", "llava_prefill.onnx"} <= set(
        os.listdir(tmp_path / "onnx")
    )
    capsys.readouterr()
    rc = main(
        [
            "bench-cpu",
            "--model",
            "tiny",
            "--compare",
            str(pruned),
            "--seq-len",
            "16",
            "--rounds",
            "2",
            "--runs",
            "1",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["engine"] == "deepsparse" and res["outputs_match"] is True
    assert set(res["speedup"]) == {"0:tiny", "1:p"}
    assert res["graphs"]["decode"]["1:p"]["sparsity"] > 0.45


def test_compilation_cache_follows_the_environment(monkeypatch, tmp_path):
    from ellava_jax.cli import use_compilation_cache

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert use_compilation_cache() is None  # set but empty: no cache
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compilation_cache() == str(tmp_path / "mine")  # the user's directory wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    blocker = tmp_path / "home"
    blocker.write_text("a file where the home directory should be")
    monkeypatch.setenv("HOME", str(blocker))
    assert use_compilation_cache() is None  # cannot make ~/.cache: the cache stays off

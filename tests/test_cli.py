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

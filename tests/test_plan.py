"""`ellava plan`: each step of a search compiled with abstract arrays, its per-device peak read
from the compiled program, nothing allocated and no file of the recipe read."""

from __future__ import annotations

import json

import jax
import pytest

from ellava_jax.cli import main
from ellava_jax.config import get_preset
from ellava_jax.plan import markdown, parse_bytes, plan, program_peak
from ellava_jax.search.settings import SearchSettings

STEPS = {"calibration", "database", "fitness", "projector", "final_prune", "evaluation"}


def _recipe(tmp_path, **kw):
    lines = {
        "model": "tiny",
        "population": 4,
        "top_k": 2,
        "proxy_segments": 4,
        "proxy_seq_len": 16,
        "proxy_multimodal_samples": 2,
        **kw,
    }
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return str(path)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_reports_every_step_and_whether_it_fits(tmp_path, capsys):
    # and reads no file of the recipe: the model, proxy and evaluation paths do not exist
    recipe = _recipe(
        tmp_path,
        model="/nonexistent/llava-1.5-7b-hf",
        proxy_text="/no/ptb.txt",
        proxy_multimodal="/no/mm.jsonl",
        eval_data="/no/eval.jsonl",
    )
    tiny = ["--model", "tiny", "--dtype", "float32"]
    # one compile of every step (about 25 s on 2 cores): a 1-byte device, where nothing fits
    assert main(["plan", "--config", recipe, "--json", *tiny, "--device-memory", "1"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res["steps"]) == STEPS and res["backend"].startswith("cpu")
    assert all(v > 0 for v in res["steps"].values())
    assert res["fits"] is False and res["device_memory"] == 1
    assert "fits in 0.0 GB: no" in out and out.count("| **no** |") == len(STEPS)
    # a limit between the smallest and largest step: the table says which steps do not fit
    lo, hi = min(res["steps"].values()), max(res["steps"].values())
    table = "\n".join(markdown({**res, "device_memory": (lo + hi) // 2}, "tiny"))
    assert "| **no** |" in table and "| yes |" in table


@pytest.mark.slow
def test_plan_figures_are_the_compiled_programs(tmp_path):
    """(Seven plans of the tiny presets: about 75 s on 2 CPU cores, so behind -m slow.) The
    fitness step's program is the population pass compiled for the recipe's sizes: twice
    the proxy rows give a bigger program, host storage moves the database off the device."""
    config = get_preset("tiny")
    base = SearchSettings(
        model="tiny",
        population=4,
        top_k=2,
        proxy_segments=4,
        proxy_seq_len=16,
        proxy_multimodal_samples=2,
    )
    a = plan(base, config, dtype="float32")
    assert a["fits"] is None and a["device_memory"] is None  # no limit given: no verdict
    llama = get_preset("tiny-llama")  # text alone: the text part is the fitness's only part
    fit = [plan(base.replace(proxy_segments=n), llama, dtype="float32") for n in (4, 16)]
    assert fit[1]["detail"]["fitness"]["program"] > fit[0]["detail"]["fitness"]["program"]
    # blocks of rows: each layer's activations and the head's logits exist for one block
    chunked = plan(base.replace(proxy_segments=16, row_chunk=4), llama, dtype="float32")
    assert chunked["detail"]["fitness"]["program"] < fit[1]["detail"]["fitness"]["program"]
    host = plan(base.replace(database_storage="host", streaming=True), config, dtype="float32")
    assert host["host_bytes"]["level_database"] > 0 == a["host_bytes"]["level_database"]
    assert host["h2d_bytes_per_round"] >= host["host_bytes"]["level_database"]
    assert "projector" in a["steps"] and "projector" not in fit[0]["steps"]  # text only
    # the projector streamed: one layer forward or backward; its layer inputs may go to the host
    mm = base.replace(proxy_multimodal_samples=4, top_k=4, database_storage="host", streaming=True)
    whole = plan(mm, config, dtype="float32")["detail"]["projector"]
    small = mm.replace(row_chunk=2, candidate_chunk=2, projector_offload=True)
    off = plan(small, config, dtype="float32")
    assert off["detail"]["projector"]["program"] < whole["program"]  # blocks
    assert off["detail"]["projector"]["held"] < whole["held"]  # layer inputs on the host
    assert (
        off["host_bytes"]["projector_layer_inputs"]
        == whole["held"] - off["detail"]["projector"]["held"]
    )


def test_program_peak_is_memory_analysis_of_the_compiled_program():
    f = jax.jit(lambda x: (x @ x.T).sum())
    x = jax.ShapeDtypeStruct((64, 32), "float32")
    m = f.lower(x).compile().memory_analysis()
    assert program_peak(f, x) == (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def test_evaluation_at_depth_two_is_the_whole_model_where_nothing_is_upcast():
    """The CPU estimate of a 16-bit evaluation compiles the scanned model at depth 2 (XLA:CPU
    upcasts every stacked layer's weights ahead of the loop): in float32, where nothing is
    upcast, it equals the whole model's compile; in bfloat16 the whole compile is larger by
    two bytes per weight of the other layers (their float32 copies), and by no more."""
    import dataclasses

    from ellava_jax.plan import evaluation_step

    base = get_preset("tiny-llama")

    def depth(n):
        return dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=n))

    whole = evaluation_step(depth(6), "float32", 0, two_layers=False)
    two = evaluation_step(depth(6), "float32", 0, two_layers=True)
    assert (two.program, two.held) == (whole.program, whole.held)
    whole16 = evaluation_step(depth(6), "bfloat16", 0, two_layers=False)
    two16 = evaluation_step(depth(6), "bfloat16", 0, two_layers=True)
    layer_bytes = whole16.held - evaluation_step(depth(5), "bfloat16", 0, two_layers=False).held
    assert two16.held == whole16.held
    assert whole16.program - two16.program == 4 * 2 * layer_bytes


def test_plan_without_model_names_the_missing_directory(tmp_path, capsys):
    # (with --model, a recipe of missing files plans: the test above)
    # without --model: the directory is missing, its name says which preset; a bad name fails
    bad = _recipe(tmp_path, model="/nonexistent/mystery-model")
    assert main(["plan", "--config", bad]) == 2
    assert "/nonexistent/mystery-model: no such model directory" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("72e9") == 72 * 10**9


@pytest.mark.slow
def test_plan_the_7b_recipe(capsys):
    """The 7B recipe with 32 multimodal samples (the user guide's table), compiled on CPU."""
    assert (
        main(
            [
                "plan",
                "--config",
                "configs/llava-1.5-7b.yaml",
                "--set",
                "proxy_multimodal=/data/mm.jsonl",
                "--device-memory",
                "72GB",
                "--json",
            ]
        )
        == 0
    )
    res = _last_json(capsys)
    assert set(res["steps"]) == STEPS
    assert res["host_bytes"]["level_database"] == pytest.approx(64.8e9, rel=0.01)
    # the recipe's settings bring every step under 72 GB (an 80 GB GPU, the target)
    assert res["fits"] and max(res["steps"].values()) <= 72e9, res["steps"]


@pytest.mark.slow
def test_plan_the_7b_recipe_on_8_devices(capsys):
    """On a data=2 x model=4 mesh (8 forced CPU devices, a process of their own) the 7B recipe
    with 32 multimodal samples needs at most 14 GB per device in every step (a v5e-8 chip holds
    16 GB)."""
    argv = [
        "plan",
        "--config",
        "configs/llava-1.5-7b.yaml",
        "--set",
        "proxy_multimodal=/data/mm.jsonl",
        "--mesh",
        "data=2,model=4",
        "--device-memory",
        "14GB",
        "--json",
    ]
    assert main(argv) == 0
    res = _last_json(capsys)
    assert res["mesh"] == {"data": 2, "model": 4} and set(res["steps"]) == STEPS
    assert res["fits"] and max(res["steps"].values()) <= 14e9, res["steps"]
    # per device: the parameters split four ways over the model axis (embeddings replicated)
    assert res["detail"]["evaluation"]["held"] < 14.1e9 / 3

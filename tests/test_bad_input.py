"""Bad input is one line naming the file, line, key or value, and exit code 2 (issue 21).

One row per case: each builds its broken input under tmp_path and returns the command line
and the fragments the error line must hold. Rows run in-process through `ellava_jax.cli.main`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

from ellava_jax.app.models import toy_dir
from ellava_jax.cli import main
from ellava_jax.errors import MissingInput, UserError

GOOD = {"question": "What is it?", "choices": ["a", "b"], "answer": 0, "category": "color"}


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _search(recipe: str, tmp_path, *extra) -> list[str]:
    return ["search", "--config", recipe, "--out", str(tmp_path / "run"), *extra]


def _toy_copy(tmp_path, change) -> str:
    """The toy model copied to tmp_path with `change(tensors)` applied to its weights."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "toy"
    shutil.copytree(toy_dir(), d)
    tensors = load_file(str(d / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def _png(path, size=32) -> str:
    from ellava_jax.data.records import save_image

    save_image(path, np.zeros((size, size, 3), np.uint8))
    return str(path)


KEY = "language_model.model.layers.0.mlp.up_proj.weight"


# --- the cases: tmp_path -> (argv, fragments of the error line) ------------------------------


def case_proxy_text_on_tiny(t):
    r = _recipe(t, "model: tiny\nproxy_text: ptb.txt\n")
    return _search(r, t, "--no-eval"), ["recipe.yaml", "proxy_text", "ptb.txt", "tiny"]


def case_proxy_text_missing(t):
    r = _recipe(t, f"model: toy\nproxy_text: {t / 'nowhere.txt'}\n")
    return _search(r, t, "--no-eval"), ["nowhere.txt", "no such proxy file"]


def case_proxy_text_empty(t):
    (t / "empty.txt").write_text("")
    r = _recipe(t, f"model: toy\nproxy_text: {t / 'empty.txt'}\n")
    return _search(r, t, "--no-eval"), ["empty.txt", "0 tokens"]


def case_proxy_text_seven_tokens(t):
    (t / "short.txt").write_text("the red cube is left of it")
    r = _recipe(t, f"model: toy\nproxy_text: {t / 'short.txt'}\nproxy_seq_len: 64\n")
    return _search(r, t, "--no-eval"), ["short.txt", "proxy stream has", "64"]


def case_int8_weights(t):
    def change(w):
        w[KEY] = np.clip(np.round(w[KEY] * 100), -127, 127).astype(np.int8)

    return ["check", "--model", _toy_copy(t, change)], ["model.safetensors", KEY, "int8"]


def case_nan_weights(t):
    def change(w):
        w[KEY] = w[KEY].copy()
        w[KEY][0, 0] = np.nan

    return ["check", "--model", _toy_copy(t, change)], ["model.safetensors", KEY, "NaN"]


def case_inf_weights(t):
    def change(w):
        w[KEY] = w[KEY].copy()
        w[KEY][1, :3] = np.inf

    return ["check", "--model", _toy_copy(t, change)], ["model.safetensors", KEY, "3 NaN or inf"]


def case_empty_eval_jsonl(t):
    (t / "empty.jsonl").write_text("\n")
    return ["eval", "--data", str(t / "empty.jsonl"), "--limit", "2"], ["empty.jsonl", "no records"]


def case_empty_recipe(t):
    r = _recipe(t, "# nothing here\n")
    return _search(r, t, "--no-eval"), ["recipe.yaml", "empty"]


def case_negative_rounds(t):
    r = _recipe(t, "model: tiny\nrounds: -2\n")
    return _search(r, t, "--no-eval"), ["recipe.yaml", "rounds=-2", ">= 0"]


def case_negative_eta(t):
    r = _recipe(t, "model: tiny\neta: -1\n")
    return _search(r, t, "--no-eval"), ["recipe.yaml", "eta=-1"]


def case_string_for_number(t):
    r = _recipe(t, "model: tiny\np0: abc\n")
    return _search(r, t, "--no-eval"), ["recipe.yaml", "p0='abc'", "number"]


def case_bool_for_int(t):
    r = _recipe(t, "model: tiny\npopulation: yes\n")
    return _search(r, t, "--no-eval"), ["recipe.yaml", "population=True", "integer"]


def _policy_case(entry):
    def case(t):
        p = t / "policy.json"
        p.write_text(json.dumps([0.5, entry]))
        argv = ["prune", "--model", "tiny", "--method", "magnitude", "--policy", str(p)]
        return [*argv, "--out", str(t / "out")], ["policy.json", "entry 1", json.dumps(entry)]

    return case


def case_prompt_longer_than_context(t):
    long = dict(GOOD, question=" ".join(["zib"] * 400))
    f = _jsonl(t / "long.jsonl", [GOOD, long])
    return ["eval", "--data", f, "--limit", "2"], ["long.jsonl:2", "tokens", "context of 256"]


def case_prompt_of_10k_tokens(t):
    f = _jsonl(t / "huge.jsonl", [dict(GOOD, question=" ".join(["zib"] * 10_000))])
    return ["eval", "--data", f], ["huge.jsonl:1", "context of 256"]


def case_image_escapes_with_dotdot(t):
    (t / "data").mkdir()
    f = _jsonl(t / "data" / "q.jsonl", [dict(GOOD, image="../../../../etc/passwd")])
    return ["eval", "--data", f], ["q.jsonl:1", "../../../../etc/passwd", "outside"]


def case_image_absolute(t):
    f = _jsonl(t / "q.jsonl", [GOOD, dict(GOOD, image="/etc/hostname")])
    return ["eval", "--data", f], ["q.jsonl:2", "/etc/hostname", "absolute"]


def case_image_symlink_out(t):
    (t / "data").mkdir()
    os.symlink("/etc/hostname", t / "data" / "img.png")
    f = _jsonl(t / "data" / "q.jsonl", [dict(GOOD, image="img.png")])
    return ["eval", "--data", f], ["q.jsonl:1", "img.png", "outside"]


def case_image_outside_image_root(t):
    (t / "root").mkdir()
    _png(t / "other.png")
    f = _jsonl(t / "q.jsonl", [dict(GOOD, image="other.png")])
    argv = ["eval", "--data", f, "--image-root", str(t / "root")]
    return argv, ["q.jsonl:1", "other.png", "outside the image root"]


def case_image_not_an_image(t):
    (t / "img.png").write_text("not a picture")
    f = _jsonl(t / "q.jsonl", [dict(GOOD, image="img.png")])
    return ["eval", "--data", f], ["q.jsonl:1", "img.png", "not an image"]


def case_calibration_image_escapes(t):
    (t / "cal").mkdir()
    f = _jsonl(t / "cal" / "c.jsonl", [{"image": "../x.png", "text": "Describe."}])
    _png(t / "x.png")
    argv = ["token-prune", "--model", "toy", "--calibration", f, "--out", str(t / "r.json")]
    return argv, ["c.jsonl:1", "../x.png", "outside"]


def case_multimodal_proxy_image_absolute(t):
    (t / "p.txt").write_text("the red cube is left of the blue ball " * 40)
    mm = _jsonl(t / "mm.jsonl", [{"image": "/etc/hostname", "text": "A picture."}])
    r = _recipe(t, f"model: toy\nproxy_text: {t / 'p.txt'}\nproxy_multimodal: {mm}\n")
    return _search(r, t, "--no-eval"), ["mm.jsonl:1", "/etc/hostname", "absolute"]


def case_bench_cpu_seq_len_too_long(t):
    argv = ["bench-cpu", "--model", "toy", "--compare", toy_dir(), "--seq-len", "256"]
    return argv, ["--seq-len=256", "context of 256", "255"]


def case_bench_cpu_seq_len_zero(t):
    return ["bench-cpu", "--model", "tiny", "--seq-len", "0"], ["--seq-len=0", ">= 1"]


def case_eval_data_is_directory(t):
    (t / "d").mkdir()
    return ["eval", "--data", str(t / "d")], [str(t / "d"), "is a directory, expected a file"]


def case_eval_data_missing(t):
    return ["eval", "--data", str(t / "none.jsonl")], ["none.jsonl", "no such evaluation file"]


def case_policy_is_directory(t):
    (t / "pol").mkdir()
    argv = ["prune", "--model", "tiny", "--method", "magnitude", "--policy", str(t / "pol")]
    return [*argv, "--out", str(t / "out")], [str(t / "pol"), "is a directory"]


def case_recipe_proxy_text_is_directory(t):
    (t / "ptb").mkdir()
    r = _recipe(t, f"model: toy\nproxy_text: {t / 'ptb'}\n")
    return _search(r, t, "--no-eval"), [str(t / "ptb"), "is a directory"]


def case_recipe_proxy_multimodal_is_directory(t):
    (t / "p.txt").write_text("the red cube is left of the blue ball " * 40)
    (t / "mm").mkdir()
    r = _recipe(t, f"model: toy\nproxy_text: {t / 'p.txt'}\nproxy_multimodal: {t / 'mm'}\n")
    return _search(r, t, "--no-eval"), [str(t / "mm"), "is a directory"]


def case_recipe_eval_data_is_directory(t):
    (t / "ev").mkdir()
    r = _recipe(t, f"model: toy\neval_data: {t / 'ev'}\n")
    return _search(r, t), [str(t / "ev"), "is a directory"]


def case_model_symlink_loop(t):
    os.symlink(t / "loop", t / "loop")
    return ["check", "--model", str(t / "loop")], [str(t / "loop"), "symbolic link loop"]


CASES = {
    "6-proxy_text-on-tiny": case_proxy_text_on_tiny,
    "6-proxy_text-missing": case_proxy_text_missing,
    "6-proxy_text-empty": case_proxy_text_empty,
    "6-proxy_text-seven-tokens": case_proxy_text_seven_tokens,
    "7-int8-weights": case_int8_weights,
    "7-nan-weights": case_nan_weights,
    "7-inf-weights": case_inf_weights,
    "8-empty-eval-jsonl": case_empty_eval_jsonl,
    "8-empty-recipe": case_empty_recipe,
    "8-rounds-negative": case_negative_rounds,
    "8-eta-negative": case_negative_eta,
    "8-p0-string": case_string_for_number,
    "8-population-bool": case_bool_for_int,
    "8-policy-entry-string": _policy_case("0000000"),
    "8-policy-entry-null": _policy_case(None),
    "8-policy-entry-object": _policy_case({}),
    "9-prompt-over-context": case_prompt_longer_than_context,
    "9-prompt-10k-tokens": case_prompt_of_10k_tokens,
    "10-image-dotdot": case_image_escapes_with_dotdot,
    "10-image-absolute": case_image_absolute,
    "10-image-symlink-out": case_image_symlink_out,
    "10-image-outside-image-root": case_image_outside_image_root,
    "10-image-not-an-image": case_image_not_an_image,
    "10-calibration-image-escapes": case_calibration_image_escapes,
    "10-multimodal-proxy-absolute": case_multimodal_proxy_image_absolute,
    "11-bench-cpu-seq-len-256": case_bench_cpu_seq_len_too_long,
    "11-bench-cpu-seq-len-0": case_bench_cpu_seq_len_zero,
    "12-eval-data-directory": case_eval_data_is_directory,
    "12-eval-data-missing": case_eval_data_missing,
    "12-policy-directory": case_policy_is_directory,
    "12-recipe-proxy_text-directory": case_recipe_proxy_text_is_directory,
    "12-recipe-proxy_multimodal-directory": case_recipe_proxy_multimodal_is_directory,
    "12-recipe-eval_data-directory": case_recipe_eval_data_is_directory,
    "13-model-symlink-loop": case_model_symlink_loop,
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, fragments = CASES[name](tmp_path)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"ellava {argv[0]}: error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


# --- what must work ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_check_runs_on_the_shipped_models(model, capsys):
    """Case 5: the prompt's text ids are none of the special ids (the toy's image token is 4)."""
    from ellava_jax.app.models import load_config
    from ellava_jax.commands.check import text_ids

    config = load_config(model)
    t = config.text
    special = {config.image_token_index, t.pad_token_id, t.bos_token_id, t.eos_token_id}
    assert not special & set(text_ids(config, 3))
    assert main(["check", "--model", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["logits_finite"]


def test_bench_cpu_default_seq_len_fits_and_refusals_leave_no_temp_dir(capsys):
    """Case 11: the default fits the decode step (half the context, at most 256); a refused
    run exports nothing and leaves no temporary directory."""
    from convert.deepsparse import check_seq_len, default_seq_len
    from ellava_jax.app.models import load_config

    toy, tiny = load_config("toy"), load_config("tiny")
    assert default_seq_len([toy]) == 128 == toy.text.max_position_embeddings // 2
    assert default_seq_len([toy, tiny]) == min(128, tiny.text.max_position_embeddings // 2)
    check_seq_len([toy], default_seq_len([toy]), ("prefill", "decode"))
    check_seq_len([toy], 256, ("prefill",))  # a prefill alone may fill the context
    with pytest.raises(UserError, match="context of 256"):
        check_seq_len([toy], 256, ("prefill", "decode"))
    pattern = os.path.join(tempfile.gettempdir(), "ellava-bench-cpu-*")
    before = set(glob.glob(pattern))
    assert main(["bench-cpu", "--model", "toy", "--seq-len", "256"]) == 2
    assert main(["bench-cpu", "--model", "toy", "--graphs", "prefill,oops"]) == 2
    assert set(glob.glob(pattern)) <= before
    assert "oops" in capsys.readouterr().err


def test_image_root_admits_images_from_its_folder(tmp_path):
    """Case 10: with an image root, images outside the jsonl's folder are read from it."""
    from ellava_jax.data.images import read_multimodal_jsonl
    from ellava_jax.eval.harness import load_eval_records
    from ellava_jax.inputs import confined_image

    (tmp_path / "data").mkdir()
    (tmp_path / "images").mkdir()
    png = _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "data" / "b.png")
    f = _jsonl(tmp_path / "data" / "q.jsonl", [dict(GOOD, image="../images/a.png")])
    with pytest.raises(UserError, match="outside the jsonl's directory"):
        load_eval_records(f)
    recs, _ = load_eval_records(f, image_root=str(tmp_path / "images"))
    assert recs[0].line == 1
    g = _jsonl(tmp_path / "data" / "abs.jsonl", [dict(GOOD, image=png)])
    assert load_eval_records(g, image_root=str(tmp_path / "images"))[0][0].image == png
    assert confined_image("b.png", f, "q:1") == (tmp_path / "data" / "b.png").resolve()
    mm = _jsonl(tmp_path / "data" / "mm.jsonl", [{"image": png, "text": "x"}])
    with pytest.raises(UserError, match=r"mm\.jsonl:1: .*absolute"):
        read_multimodal_jsonl(mm)
    rows = read_multimodal_jsonl(mm, image_root=str(tmp_path / "images"))
    assert rows[0]["image"] == str((tmp_path / "images" / "a.png").resolve())
    with pytest.raises(MissingInput, match="no such image"):
        confined_image("gone.png", f, "q.jsonl:3")


def test_search_settings_ranges_and_types(tmp_path):
    """Case 8: every numeric setting has a range, every setting a type; errors name the key."""
    from ellava_jax.search.settings import SearchSettings, load_settings

    bad = {
        "p0": 1.0,
        "step": 0,
        "width": -0.1,
        "tol": -1,
        "population": 1,
        "rounds": -1,
        "top_k": 0,
        "neighbors": 0,
        "init_std": 0,
        "eta": float("nan"),
        "projector_steps": -1,
        "projector_lr": 0,
        "projector_mass": 1.5,
        "proxy_segments": 0,
        "proxy_seq_len": 1,
        "proxy_multimodal_samples": 0,
        "calib_batch_size": 0,
        "eval_limit": 0,
        "seed": -1,
        "streaming": "yes",
        "model": 3,
        "proxy_text": "",
    }
    for key, value in bad.items():
        with pytest.raises(UserError, match=rf"\b{key}="):
            SearchSettings(**{key: value})
    s = SearchSettings(eta=1, projector_mass=1)  # an int where a float goes
    assert isinstance(s.eta, float) and s.projector_mass == 1.0
    r = _recipe(tmp_path, "p0: 0.5\nrounds: 3\n")
    with pytest.raises(UserError, match=r"rounds=-1.*overriding .*recipe\.yaml"):
        load_settings(r, rounds=-1)

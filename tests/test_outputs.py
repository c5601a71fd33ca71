"""Nothing lost: `--out` never replaces what ellava did not write, writes are whole or absent,
exit codes say whose fault it was, and a search resumes only itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ellava_jax.cli import main
from ellava_jax.outputs import MARKER, atomic_directory, clean_leftovers

TINY = ["--model", "tiny"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if not x.startswith(("calibrate", "prune"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# every command that writes refuses an OUT holding what ellava did not write


COMMANDS = {
    "prune": ["prune", *TINY, "--method", "magnitude"],
    "convert": ["convert", *TINY],
    "export": ["export", *TINY],
    "token-prune": ["token-prune", *TINY, "--samples", "2"],
    "search": ["search", "--config", "configs/tiny.yaml", "--no-eval"],
    "demo": ["demo", *TINY, "--skip-cpu-bench"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_holding_user_files_is_refused_and_kept(command, tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    (out / "thesis.txt").write_text("notes")
    if command == "token-prune":  # writes one file: an existing file it did not write
        out = tmp_path / "thesis.json"
        out.write_text('{"chapter": 1}')
    rc, _, err = _run([*COMMANDS[command], "--out", str(out)], capsys)
    assert rc == 2
    line = _one_line(err)
    assert str(out.name) in line and "--overwrite" in line
    if command == "token-prune":
        assert out.read_text() == '{"chapter": 1}'
    else:
        assert sorted(os.listdir(out)) == ["thesis.txt"]
        assert (out / "thesis.txt").read_text() == "notes"


def test_prune_replaces_its_own_output_and_overwrite_replaces_anything(tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["prune", *TINY, "--method", "magnitude", "--out", str(out)]
    assert _run(argv, capsys)[0] == 0
    assert json.loads((out / MARKER).read_text())["command"] == "prune"
    (out / "sparsity.json").write_text("old")
    assert _run(argv, capsys)[0] == 0  # a previous prune output: replaced
    assert (out / "sparsity.json").read_text() != "old"
    # another command's output is not prune's to replace
    rc, _, err = _run(["convert", *TINY, "--out", str(out)], capsys)
    assert rc == 2 and "output of `ellava prune`" in _one_line(err)
    (out / "notes.txt").write_text("mine")
    rc, _, err = _run(["convert", *TINY, "--out", str(out), "--overwrite"], capsys)
    assert rc == 0 and not (out / "notes.txt").exists()
    assert json.loads((out / MARKER).read_text())["command"] == "convert"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or ".old-" in n]


def _model_copy(tmp_path, capsys):
    model = tmp_path / "models" / "m"
    assert _run(["convert", *TINY, "--out", str(model)], capsys)[0] == 0
    (model / "train_report.json").write_text("{}")
    return model


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_is_never_the_input_model_or_around_it(where, tmp_path, capsys):
    model = _model_copy(tmp_path, capsys)
    out = {"same": model, "parent": model.parent, "inside": model / "pruned"}[where]
    for extra in ([], ["--overwrite"]):
        rc, _, err = _run(
            ["prune", "--model", str(model), "--method", "magnitude", "--out", str(out), *extra],
            capsys,
        )
        assert rc == 2 and "input" in _one_line(err) and str(out.name) in err
    assert (model / "train_report.json").exists() and (model / "config.json").exists()


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "F"
    f.write_text("mine")
    argv = ["prune", *TINY, "--method", "magnitude", "--out"]
    rc, _, err = _run([*argv, str(f)], capsys)
    assert rc == 2 and "is a file" in _one_line(err) and f.read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n != "F"]  # no F.old-*, no temp dir
    rc, _, err = _run([*argv, str(f / "sub")], capsys)
    assert rc == 2 and "F is a file" in _one_line(err)
    rc, _, err = _run(["token-prune", *TINY, "--out", str(tmp_path)], capsys)
    assert rc == 2 and "is a directory" in _one_line(err)


@pytest.mark.parametrize("target", ["/proc/ellava-out", "/sys/ellava-out"])
def test_unwritable_target_is_an_environment_failure_before_any_work(target, capsys, monkeypatch):
    try:
        os.mkdir(target)
    except OSError:
        pass
    else:
        os.rmdir(target)
        pytest.skip(f"{target} is writable on this machine")
    from ellava_jax.prune import pipeline

    monkeypatch.setattr(pipeline, "prune_model", _must_not_run)
    rc, _, err = _run(["prune", *TINY, "--method", "magnitude", "--out", target], capsys)
    assert rc == 1
    assert _one_line(err).startswith(f"ellava prune: failed: {target}: cannot write there")


def _must_not_run(*a, **k):
    raise AssertionError("the work started before the target was checked")


def test_full_disk_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import shutil

    model = _model_copy(tmp_path, capsys)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    from ellava_jax.prune import pipeline

    monkeypatch.setattr(pipeline, "prune_model", _must_not_run)
    out = tmp_path / "p"
    rc, _, err = _run(
        ["prune", "--model", str(model), "--method", "magnitude", "--out", str(out)], capsys
    )
    assert rc == 1 and "writes about" in _one_line(err) and "free" in err
    assert not out.exists()


def test_disk_full_during_the_write_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import convert.hf as hf

    def full(*a, **k):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr(hf, "save_file", full)
    out = tmp_path / "p"
    rc, _, err = _run(["prune", *TINY, "--method", "magnitude", "--out", str(out)], capsys)
    assert rc == 1 and "No space left on device" in _one_line(err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_interrupt_cleans_up_and_keeps_the_previous_output(stop, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    argv = ["prune", *TINY, "--method", "magnitude", "--out", str(out)]
    assert _run(argv, capsys)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    import convert.hf as hf

    def interrupted(*a, **k):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(hf, "save_file", interrupted)
    rc, _, err = _run(argv, capsys)
    assert rc == {"ctrl-c": 130, "sigterm": 143}[stop]
    assert ("Ctrl-C" if stop == "ctrl-c" else "SIGTERM") in _one_line(err)
    assert os.listdir(tmp_path) == ["p"] and (out / "model.safetensors").read_bytes() == before


def test_internal_bug_shows_its_traceback_and_asks_for_a_report(capsys, monkeypatch, tmp_path):
    from ellava_jax.prune import pipeline

    monkeypatch.setattr(pipeline, "parse_nm", lambda s: 1 / 0)
    rc, _, err = _run(["prune", *TINY, "--out", str(tmp_path / "p")], capsys)
    assert rc == 70 and "Traceback" in err and "ZeroDivisionError" in err
    assert "please report it" in err.strip().splitlines()[-1]


def _disk_full():
    raise OSError(28, "No space left on device", "/results/runs.jsonl")


def _user():
    from ellava_jax.errors import UserError

    raise UserError("--set proxy_segments=0: must be >= 1")


@pytest.mark.parametrize(
    "body, code, says",
    [
        (_user, 2, "real_model.py: error: --set proxy_segments=0"),
        (_disk_full, 1, "real_model.py: failed: /results/runs.jsonl: No space left on device"),
        (lambda: 1 / 0, 70, "real_model.py: internal error (ZeroDivisionError)"),
        (lambda: 3, 3, None),
    ],
)
def test_benchmark_scripts_end_as_the_command_line_does(body, code, says, capsys, monkeypatch):
    # the benchmark scripts' `__main__` (errors.run_script) and `ellava` share one handler
    from ellava_jax.errors import run_script

    monkeypatch.setattr(sys, "argv", ["benchmarks/real_model.py", "--seeds", "0"])
    with pytest.raises(SystemExit) as stop:
        run_script(body)
    err = capsys.readouterr().err
    assert stop.value.code == code
    if says is None:
        assert err == ""
    else:
        assert says in err.strip().splitlines()[-1]
        assert ("Traceback" in err) == (code == 70)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(umask, tmp_path, capsys):
    old = os.umask(umask)
    try:
        out = tmp_path / "p"
        assert _run(["prune", *TINY, "--method", "magnitude", "--out", str(out)], capsys)[0] == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_config_error_leaves_no_out(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("p0: 0.5\npopulaton: 16\n")
    out = tmp_path / "run"
    rc, _, err = _run(["search", "--config", str(bad), "--out", str(out)], capsys)
    assert rc == 2 and "populaton" in _one_line(err)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# leftovers of killed writers


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import convert.hf as hf
    from ellava_jax.cli import main

    def save_file(tensors, path, metadata=None):  # `ellava prune` in the middle of its write
        open(path, "wb").write(b"half")
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(os.path.dirname(path), flush=True)
        sys.stdin.read()  # a live writer: holds its temporary directory until stdin closes

    hf.save_file = save_file
    main(["prune", "--model", "tiny", "--method", "magnitude", "--out", sys.argv[1]])
    """
)


def _writer(out, mode):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(out), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_killed_prune_write_is_cleaned_by_the_next_run_but_a_live_one_is_not(tmp_path, capsys):
    out = tmp_path / "p"
    live = _writer(out, "live")
    live_tmp = live.stdout.readline().strip()
    try:
        killed = _writer(out, "kill")
        assert killed.wait() == -signal.SIGKILL
        [left] = [
            n
            for n in os.listdir(tmp_path)
            if n.startswith(".tmp-p-") and n != os.path.basename(live_tmp)
        ]
        rc, _, err = _run(["prune", *TINY, "--method", "magnitude", "--out", str(out)], capsys)
        assert rc == 0 and "removed what a killed run left" in err
        assert not (tmp_path / left).exists()
        assert os.path.isdir(live_tmp)  # a live run's directory is never touched
        assert (out / "config.json").exists()
    finally:
        live.stdin.close()
        live.wait()


def test_a_kill_between_the_two_renames_restores_the_previous_output(tmp_path):
    out = tmp_path / "p"
    with atomic_directory(out, "prune") as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # what a writer killed after moving the old output aside and before the new one's rename
    # leaves: the old output under its aside name, no output
    os.rename(out, tmp_path / f"p.old-{dead.pid}.0-abc123")
    assert clean_leftovers(out, say=lambda m: None)
    assert (out / "weights").read_text() == "v1" and os.listdir(tmp_path) == ["p"]


# ---------------------------------------------------------------------------------------------
# the search resumes only itself


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    p = tmp_path_factory.mktemp("recipe") / "small.yaml"
    p.write_text(
        "model: tiny\np0: 0.5\npopulation: 4\nrounds: 2\ntop_k: 2\nneighbors: 1\n"
        "projector_steps: 1\nproxy_segments: 4\nproxy_seq_len: 16\n"
        "proxy_multimodal_samples: 2\nseed: 0\n"
    )
    return str(p)


def _search(recipe, out, capsys, *extra):
    return _run(["search", "--config", recipe, "--out", str(out), "--no-eval", *extra], capsys)


@pytest.fixture(scope="module")
def two_rounds(recipe, tmp_path_factory):
    """A finished 2-round search: (its directory, its result)."""
    out = tmp_path_factory.mktemp("search") / "direct"
    assert main(["search", "--config", recipe, "--out", str(out), "--no-eval"]) == 0
    return out, json.loads((out / "result.json").read_text())


def _same_search(a: dict, b: dict):
    assert a["policy"] == b["policy"]
    np.testing.assert_allclose(a["best_fitness"], b["best_fitness"], rtol=1e-6)


def test_search_settings_are_checked_before_resuming(recipe, two_rounds, capsys, monkeypatch):
    out, first = two_rounds
    rc, _, err = _search(recipe, out, capsys, "--p0", "0.4")
    assert rc == 2 and "p0 0.5 there, 0.4 now" in _one_line(err)
    rc, _, err = _search(recipe, out, capsys, "--seed", "3")
    assert rc == 2 and "seed 0 there, 3 now" in _one_line(err)
    rc, _, err = _search(recipe, out, capsys, "--rounds", "1")
    assert rc == 2 and "2 rounds of this search are done" in _one_line(err)
    # a finished search: its result, nothing rebuilt
    from ellava_jax.app import search as run

    monkeypatch.setattr(run, "build_database", _must_not_run)
    rc, out_text, _ = _search(recipe, out, capsys, "--json")
    assert rc == 0 and json.loads(out_text.strip().splitlines()[-1])["policy"] == first["policy"]


def test_raising_rounds_continues_to_what_a_direct_run_finds(recipe, tmp_path, capsys):
    out = tmp_path / "grown"
    assert _search(recipe, out, capsys, "--rounds", "1")[0] == 0
    rc, text, _ = _search(recipe, out, capsys, "--rounds", "3")
    assert rc == 0 and "resuming after round 1 of 3" in text
    direct = tmp_path / "direct3"
    assert _search(recipe, direct, capsys, "--rounds", "3")[0] == 0
    _same_search(
        json.loads((out / "result.json").read_text()),
        json.loads((direct / "result.json").read_text()),
    )
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("damage", ["array file", "metadata", "logs"])
# orbax leaves the coroutines of the failed read un-awaited; the test is about what follows
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_round_falls_back_to_the_intact_one(
    damage, recipe, two_rounds, tmp_path, capsys
):
    import shutil

    src, first = two_rounds
    out = tmp_path / "run"
    shutil.copytree(src, out)
    (out / "result.json").unlink()  # as if killed after the last round's checkpoint
    latest = out / "checkpoints" / "1"
    if damage == "logs":
        victim = out / "checkpoints" / "logs-1.json"
    elif damage == "metadata":
        victim = next(p for p in latest.rglob("_METADATA"))
    else:
        victim = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 3)])
    rc, text, _ = _search(recipe, out, capsys)
    assert rc == 0 and "round 2's checkpoint is unreadable" in text
    _same_search(json.loads((out / "result.json").read_text()), first)


def test_a_second_search_on_the_same_out_is_refused(recipe, two_rounds, capsys):
    from ellava_jax.app.resume import RunLock

    out, _ = two_rounds
    with RunLock(str(out)):
        rc, _, err = _search(recipe, out, capsys)
    assert rc == 2 and "another ellava search is running there" in _one_line(err)


def test_overwrite_starts_the_search_afresh(recipe, two_rounds, tmp_path, capsys):
    import shutil

    src, first = two_rounds
    out = tmp_path / "run"
    shutil.copytree(src, out)
    (out / "notes.txt").write_text("mine")
    assert _search(recipe, out, capsys, "--p0", "0.4")[0] == 2
    rc, text, _ = _search(recipe, out, capsys, "--p0", "0.4", "--overwrite", "--json")
    assert rc == 0 and "resuming" not in text and not (out / "notes.txt").exists()
    assert json.loads((out / "result.json").read_text())["settings"]["p0"] == 0.4


def test_checkpoints_without_a_fingerprint_are_not_resumed(recipe, two_rounds, tmp_path, capsys):
    import shutil

    src, _ = two_rounds
    out = tmp_path / "run"
    shutil.copytree(src, out)
    (out / "search.json").unlink()
    rc, _, err = _search(recipe, out, capsys)
    assert rc == 2 and "without search.json" in _one_line(err)

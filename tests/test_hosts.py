"""Several hosts: the search and the prune as 2 processes on 127.0.0.1 (2 CPU devices each,
JAX's gloo collectives), killed and resumed, against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from ellava_jax.errors import UserError
from tests.conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
ELLAVA = [sys.executable, "-m", "ellava_jax.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], logs: Path) -> list[subprocess.Popen]:
    """`ellava ARGV` as processes 0 and 1 of 2, 2 CPU devices each; output in logs/out-I."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        with open(logs / f"out-{i}", "w") as f:
            procs.append(
                subprocess.Popen(
                    [*ELLAVA, *argv, *flags, "--process-id", str(i)],
                    env=env,
                    cwd=ROOT,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _finish(procs, logs: Path, timeout=600) -> list[str]:
    for p in procs:
        p.wait(timeout=timeout)
    outs = [(logs / f"out-{i}").read_text() for i in range(len(procs))]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_the_search_as_two_processes_is_killed_resumes_and_gives_the_one_process_policy(tmp_path):
    """`ellava search` on the tiny preset (3 rounds) as 2 processes on a data=2 x model=2 mesh
    (the model axis inside each process, data across them): killed (SIGKILL, both) once its
    first round's checkpoint is written, started again, it resumes and finds the policy and
    best J of one process; process 0 alone writes the outputs and speaks."""
    from ellava_jax.app.search import run_search
    from ellava_jax.search.settings import load_settings

    out = tmp_path / "hosts"
    argv = ["search", "--config", "configs/tiny.yaml", "--no-eval", "--json"]
    argv += ["--mesh", "data=2,model=2", "--out", str(out)]
    procs = _start(argv, tmp_path / "killed")
    first = out / "checkpoints" / "0"
    deadline = time.time() + 600
    while not first.is_dir() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), (tmp_path / "killed" / "out-0").read_text()
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert first.is_dir() and not (out / "result.json").exists()

    outs = _finish(_start(argv, tmp_path / "resumed"), tmp_path / "resumed")
    assert "resuming after round" in outs[0], outs[0][-2000:]
    assert "resuming" not in outs[1] and "policy:" not in outs[1], outs[1][-2000:]
    hosts = json.loads(outs[0].strip().splitlines()[-1])
    result = json.loads((out / "result.json").read_text())
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 3
    for d in ("model", "uniform", "checkpoint", "projector", "masks.npz"):
        assert (out / d).exists(), d

    one = run_search(
        load_settings("configs/tiny.yaml"), str(tmp_path / "one"), progress=False, say=lambda *a: 0
    )
    assert hosts["policy"] == result["policy"] == one["policy"]
    assert abs(result["best_fitness"] - one["best_fitness"]) <= 1e-4 * abs(one["best_fitness"])


def test_prune_as_two_processes_gives_the_one_process_masks(tmp_path):
    """`ellava prune --method sparsegpt` on the tiny preset as 2 processes (data=2 x model=2): process 0
    writes the directory; its masks agree with one process's on >= 99.99% of entries."""
    import jax

    from ellava_jax.cli import main
    from ellava_jax.prune.masks import load_masks

    argv = ["prune", "--model", "tiny", "--method", "sparsegpt", "--sparsity", "0.5"]
    hosts = argv + ["--mesh", "data=2,model=2", "--out", str(tmp_path / "hosts")]
    outs = _finish(_start(hosts, tmp_path / "logs"), tmp_path / "logs")
    assert "wrote" in outs[0] and "wrote" not in outs[1]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    a, b = (load_masks(str(tmp_path / d / "masks.npz")) for d in ("hosts", "one"))
    pairs = [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    same = sum(int((x == y).sum()) for x, y in pairs)
    assert same / sum(x.size for x, _ in pairs) >= 0.9999


def test_host_flags_are_checked_before_anything_starts():
    from ellava_jax.distributed import initialize

    def flags(**kw):
        return Namespace(**({"coordinator": None, "num_processes": None, "process_id": None} | kw))

    with pytest.raises(UserError, match="--coordinator given without --num-processes, --process"):
        initialize(flags(coordinator="127.0.0.1:1234"))
    with pytest.raises(UserError, match=r"--process-id 2: expected 0..1 \(--num-processes 2\)"):
        initialize(flags(coordinator="h:1", num_processes=2, process_id=2))
    with pytest.raises(UserError, match="--coordinator 'h': expected HOST:PORT"):
        initialize(flags(coordinator="h", num_processes=2, process_id=0))
    initialize(flags())  # no flags, no cluster: one process, nothing started

"""The package works installed, away from the checkout: the recipes (configs/) and the toy come
from the wheel, and DeepSparse's environment is looked for where setup puts it, or its absence
says how to create it.

The slow test builds the wheel, installs it into a fresh environment that reuses .venv's
dependencies but not its editable install of ellava-jax, and runs `ellava demo --model tiny`
from a temporary directory (`pytest -m slow tests/test_install.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a build must not pick up from the checkout (environments, caches, runs, old builds).
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "runs",
    "build",
    "dist",
    ".whl",
    ".gl",
)


def test_deepsparse_env_is_looked_for_and_its_absence_says_how(tmp_path, monkeypatch):
    from convert import deepsparse as ds

    monkeypatch.delenv("DEEPSPARSE_VENV", raising=False)
    # ELLAVA_DEEPSPARSE_PYTHON, when set, is the one place looked at
    fake = tmp_path / "ds" / "bin" / "python"
    monkeypatch.setenv("ELLAVA_DEEPSPARSE_PYTHON", str(fake))
    assert ds.deepsparse_python() == fake and not ds.available()
    assert f"ELLAVA_DEEPSPARSE_PYTHON={fake}" in ds.setup_hint()
    assert "scripts/setup_deepsparse.sh" in ds.setup_hint()  # in a checkout: its script
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    assert ds.available()
    # where setup_deepsparse.sh put it (DEEPSPARSE_VENV), before the checkout's
    monkeypatch.delenv("ELLAVA_DEEPSPARSE_PYTHON")
    monkeypatch.setenv("DEEPSPARSE_VENV", str(tmp_path / "ds"))
    assert ds.deepsparse_python() == fake
    # installed (no checkout around the module) and nothing set: one line saying how
    monkeypatch.delenv("DEEPSPARSE_VENV")
    monkeypatch.setattr(ds, "ROOT", tmp_path / "site-packages")
    assert not ds.available()
    hint = ds.setup_hint()
    assert "\n" not in hint
    assert "bash scripts/setup_deepsparse.sh` in an ellava-jax checkout" in hint
    assert "ELLAVA_DEEPSPARSE_PYTHON" in hint


def test_recipes_are_package_data():
    """configs/ is the `configs` package, its YAML files package data, read by name."""
    import tomllib

    from ellava_jax.search.settings import load_settings, recipe_path, shipped_recipes

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "configs" in project["packages"]["find"]["include"]
    assert project["package-data"]["configs"] == ["*.yaml"]
    assert (ROOT / "configs" / "__init__.py").is_file()
    shipped = shipped_recipes()
    assert set(shipped) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert recipe_path("toy") == recipe_path("toy.yaml") == shipped["toy"]
    assert load_settings("toy-p05").p0 == 0.5


def _fresh_env(tmp: Path) -> Path:
    """A venv whose path holds .venv's installed packages (pip included) through one .pth
    file pointing at a folder of links, with ellava-jax's own editable install left out."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in ours.iterdir():
        name = entry.name
        if (
            name.endswith(".pth")
            or name.startswith(("__editable__", "ellava_jax", "ellava-jax"))
            or name in ("configs", "convert", "__pycache__")
        ):
            continue
        (deps / name).symlink_to(entry)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "_ellava_test_deps.pth").write_text(f"{deps}\n")
    return venv


@pytest.mark.slow
def test_wheel_installs_and_demo_runs_outside_the_checkout(tmp_path):
    """pip wheel . -> a fresh venv -> `ellava demo --model tiny` from another directory."""
    t0 = time.perf_counter()
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES, symlinks=True)  # the build writes build/
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env |= {"JAX_PLATFORMS": "cpu", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-q", "-w", str(wheels), str(src)],
        check=True,
        env=env,
    )
    (wheel,) = wheels.glob("ellava_jax-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "configs/toy.yaml" in names and "configs/__init__.py" in names
    assert "ellava_jax/assets/toy/model.safetensors" in names
    assert "convert/deepsparse_runner.py" in names

    venv = _fresh_env(tmp_path)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        env=env,
    )
    t_install = time.perf_counter() - t0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import configs, convert, ellava_jax; print(ellava_jax.__file__); "
            "print(configs.__file__); print(convert.__file__)",
        ],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for f in where:
        assert Path(f).resolve().is_relative_to(venv.resolve()), f"{f} is not the installed copy"

    out = tmp_path / "x"
    res = subprocess.run(
        [str(venv / "bin" / "ellava"), "demo", "--model", "tiny", "--out", str(out)]
        + ["--skip-cpu-bench", "--rounds", "1"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "report.md").is_file()
    for ours in ("ellava_jax", "configs", "convert"):  # nothing read from the checkout
        assert str(ROOT / ours) not in res.stdout + res.stderr
    # the installed package's DeepSparse lookup: not beside the source tree, and it says how
    hint = subprocess.run(
        [
            str(py),
            "-c",
            "from convert import deepsparse as d; print(d.available(), d.setup_hint())",
        ],
        cwd=elsewhere,
        env={
            k: v for k, v in env.items() if k not in ("ELLAVA_DEEPSPARSE_PYTHON", "DEEPSPARSE_VENV")
        },
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert hint.startswith("False ") and "bash scripts/setup_deepsparse.sh" in hint
    print(f"\nwheel + install {t_install:.1f} s; demo {time.perf_counter() - t0 - t_install:.1f} s")

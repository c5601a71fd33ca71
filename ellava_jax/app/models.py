"""Where `--model` points: a named built-in model or a local HF LLaVA directory."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from convert.hf import load_hf_llava
from ellava_jax.config import LlavaConfig, get_preset
from ellava_jax.errors import MissingInput
from ellava_jax.inputs import check_dir
from ellava_jax.model import init_params
from ellava_jax.toy.defaults import NAME as TOY_NAME
from ellava_jax.toy.defaults import model_dir as toy_dir


def resolve_model_dir(spec: str) -> str | None:
    """`toy` -> the shipped toy's directory; a path -> itself; `tiny` -> None (built in memory)."""
    if spec == TOY_NAME:
        d = toy_dir()
        if not os.path.exists(os.path.join(d, "config.json")):
            raise MissingInput(f"{d}: the shipped toy model is missing from this install")
        return d
    if spec == "tiny":
        return None
    return check_dir(
        spec, "model directory", missing="no such model directory (or use 'toy' or 'tiny')"
    )


def load_config(spec: str) -> LlavaConfig:
    """The config of `--model SPEC` alone (no weights read): for checks before any work."""
    d = resolve_model_dir(spec)
    return get_preset("tiny") if d is None else LlavaConfig.from_hf_config(d)


def load_model(spec: str, dtype=None, seed: int = 0) -> tuple[LlavaConfig, dict, str | None]:
    """Returns (config, params, directory or None) for `--model SPEC`.

    `tiny` is the randomly initialised test preset (seeded); `toy` the shipped trained model;
    anything else a local HF LLaVA directory.
    """

    d = resolve_model_dir(spec)
    if d is None:
        config = get_preset("tiny")
        return config, init_params(config, jax.random.key(seed), dtype or jnp.float32), None
    config, params = load_hf_llava(d, dtype=dtype)
    return config, params, d

"""Shared fixtures: tiny configs and HF reference models (torch is a test-only reference)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

# Tests compile in their own process and leave no cache behind (the CLI would keep one).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

# Tests compile hundreds of small programs and run most of them once, so XLA's LLVM backend
# optimisation is most of the suite's time (tests/test_search.py on 2 AVX2 cores: 318 s, 64 s
# of it left with every program already compiled). Level 0 changes float rounding, not the
# program; commands and benchmarks run at XLA's default. Subprocesses inherit it (TEST_XLA_FLAGS).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

from ellava_jax.config import LlavaConfig, get_preset  # noqa: E402 (after XLA_FLAGS is set)


def tiny_config(**overrides) -> LlavaConfig:
    """The `tiny` preset with LlavaConfig / TextConfig / VisionConfig fields overridden.

    Keys prefixed `text_` or `vision_` go to the sub-configs.
    """
    base = get_preset("tiny")
    top_fields = {f.name for f in dataclasses.fields(LlavaConfig)}
    top = {k: v for k, v in overrides.items() if k in top_fields}
    text = {k[5:]: v for k, v in overrides.items() if k not in top and k.startswith("text_")}
    vision = {k[7:]: v for k, v in overrides.items() if k not in top and k.startswith("vision_")}
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, **text),
        vision=dataclasses.replace(base.vision, **vision),
        **top,
    )


def hf_model(config: LlavaConfig, seed: int = 0):
    """A randomly initialised transformers LlavaForConditionalGeneration for `config`."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.LlavaConfig(**config.to_hf_config())
    model = transformers.LlavaForConditionalGeneration(hf_cfg)
    # HF initialises norms to 1 and biases to 0; perturb them so the parity test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def prompt_batch(config: LlavaConfig, images_per_row=(1, 1), pad=(2, 0), seed=0):
    """input_ids / attention_mask / pixel_values for a left-padded batch with images."""
    rng = np.random.default_rng(seed)
    n = config.num_image_tokens
    text_vocab = config.image_token_index  # ids below the placeholder id are plain text
    rows = []
    for k in images_per_row:
        row = [int(x) for x in rng.integers(3, text_vocab, 3)]
        for _ in range(k):
            row += [config.image_token_index] * n + [int(x) for x in rng.integers(3, text_vocab, 2)]
        rows.append(row)
    width = max(len(r) + p for r, p in zip(rows, pad))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    v = config.vision
    pix = rng.standard_normal((sum(images_per_row), v.num_channels, v.image_size, v.image_size))
    return ids, mask, pix.astype(np.float32)


@pytest.fixture
def tiny():
    return get_preset("tiny")

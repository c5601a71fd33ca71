"""The LLaVA-1.5 model in Flax: CLIP tower, projector, LLaMA decoder, greedy generation; a
text-only config (`LlavaConfig.text_only`) is a plain LLaMA causal LM through the same functions."""

from ellava_jax.model.generate import generate
from ellava_jax.model.llama import init_cache
from ellava_jax.model.llava import (
    decode,
    embed_image,
    embed_inputs,
    embed_text,
    forward,
    init_params,
    lm_head,
    merge_image_features,
    param_shapes,
    project,
    refuse_images,
    vision_features,
)

__all__ = [
    "decode",
    "embed_image",
    "embed_inputs",
    "embed_text",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "lm_head",
    "merge_image_features",
    "param_shapes",
    "project",
    "refuse_images",
    "vision_features",
]

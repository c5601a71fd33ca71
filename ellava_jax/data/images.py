"""Image files -> CLIP pixel values, as a model directory's `preprocessor_config.json` says.

CLIPImageProcessor's steps: resize the shortest edge (bicubic), centre crop, rescale to [0, 1],
normalise with the image mean / std, channels first. Without a preprocessor config the tower's
`image_size` and CLIP's mean / std are used.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from ellava_jax.config import LlavaConfig
from ellava_jax.data.records import load_image
from ellava_jax.errors import UserError
from ellava_jax.inputs import check_image_header, confined_image, jsonl_objects

# CLIP's normalisation (openai/clip-vit-*), LLaVA-1.5's image processor defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_values(images: np.ndarray) -> np.ndarray:
    """uint8 images [B, S, S, 3] (or one [S, S, 3]) -> float32 [B, 3, S, S], CLIP-normalised."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    x = x.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocessor(model_dir: str | None, config: LlavaConfig) -> dict:
    """Resize / crop size and mean / std for the model."""
    s = config.vision.image_size
    out = {"shortest_edge": s, "crop": s, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    path = None if model_dir is None else os.path.join(model_dir, "preprocessor_config.json")
    if path and os.path.exists(path):
        with open(path) as f:
            pc = json.load(f)
        size = pc.get("size", s)
        out["shortest_edge"] = (
            size.get("shortest_edge", size.get("height", s)) if isinstance(size, dict) else size
        )
        crop = pc.get("crop_size", out["shortest_edge"])
        out["crop"] = crop.get("height", s) if isinstance(crop, dict) else crop
        out["mean"] = pc.get("image_mean", out["mean"])
        out["std"] = pc.get("image_std", out["std"])
    return out


def to_pixel_values(image: np.ndarray, prep: dict) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, crop, crop]."""

    im = Image.fromarray(np.asarray(image, np.uint8))
    w, h = im.size
    short = prep["shortest_edge"]
    if min(w, h) != short:
        scale = short / min(w, h)
        im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    c = prep["crop"]
    left, top = (w - c) // 2, (h - c) // 2
    im = im.crop((left, top, left + c, top + c))
    x = np.asarray(im, np.float32) / 255.0
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_pixels(
    path: str, model_dir: str | None, config: LlavaConfig, where: str | None = None
) -> np.ndarray:
    """An image file as the model's pixel values [3, S, S]; errors name `where` (a jsonl line)."""
    return to_pixel_values(load_image(path, where), preprocessor(model_dir, config))


def read_multimodal_jsonl(
    path: str, image_root: str | None = None, limit: int | None = None
) -> list[dict]:
    """Image + text records: one object per line with `image` (path) and `text`.

    The first `limit` rows (all when None), each {"image": resolved path, "text", "line"}. Image
    paths are relative to the file's directory and must stay inside it, or inside `image_root`
    when given (`inputs.confined_image`); every image must exist and be an image file. A file
    without rows is an error.
    """
    rows = []
    for n, where, obj in jsonl_objects(path, "multimodal jsonl file"):
        if limit is not None and len(rows) >= limit:
            break
        for k in ("image", "text"):
            if not isinstance(obj.get(k), str):
                raise UserError(f"{where}: missing string field {k!r}")
        image = confined_image(obj["image"], path, where, image_root)
        check_image_header(image, where)
        rows.append({**obj, "image": str(image), "line": n})
    if not rows:
        raise UserError(f"{path}: no records (expected jsonl rows with 'image' and 'text')")
    return rows


def rows_pixels(path: str, rows: list[dict], model_dir: str | None, config) -> np.ndarray:
    """Pixel values [N, 3, S, S] of `read_multimodal_jsonl` rows of `path`."""
    return np.stack(
        [load_pixels(r["image"], model_dir, config, where=f"{path}:{r['line']}") for r in rows]
    )

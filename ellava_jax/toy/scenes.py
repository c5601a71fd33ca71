"""Procedural scenes of the toy task: coloured shapes in a 2x2 grid, drawn with numpy only.

A scene is 1-4 objects, each a distinct kind (colour x shape) with a size and a cell of the
2x2 grid, jittered inside its cell. Images are 32x32 RGB: with the toy CLIP tower's patch size
4 that is 8x8 = 64 visual tokens. Which split a scene belongs to is decided by a hash of its
content (`scene_bucket`), so two splits can never hold the same image, whatever seeds draw them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ellava_jax.data.images import CLIP_MEAN, CLIP_STD

IMAGE_SIZE = 32  # pixels per side
PATCH_SIZE = 4  # the toy CLIP tower's patch: (32 / 4)^2 = 64 visual tokens
CELL = IMAGE_SIZE // 2

# CLIP's normalisation (openai/clip-vit-*; llava-hf's preprocessor_config.json says the same).

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
}
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = {"small": 4, "large": 6}  # half-extent in pixels
# Row-major cells of the 2x2 grid; the name is what questions and descriptions say.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = 4

# Split of the scene space by content hash: bucket = hash % 100.
SPLIT_BUCKETS: dict[str, range] = {
    "train": range(0, 70),
    "proxy": range(70, 80),
    "validation": range(80, 90),
    "test": range(90, 100),
}


@dataclass(frozen=True)
class Obj:
    """One object: kind (colour, shape), size name, grid cell index, jitter in pixels."""

    colour: str
    shape: str
    size: str
    cell: int  # index into POSITIONS
    dx: int
    dy: int

    @property
    def kind(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def row(self) -> int:
        return self.cell // 2

    @property
    def col(self) -> int:
        return self.cell % 2

    def centre(self) -> tuple[int, int]:
        """(x, y) pixel centre."""
        return (self.col * CELL + CELL // 2 + self.dx, self.row * CELL + CELL // 2 + self.dy)


@dataclass(frozen=True)
class Scene:
    """Objects (distinct kinds, distinct cells, sorted by cell) and a background grey level."""

    objects: tuple[Obj, ...]
    background: int

    def key(self) -> str:
        """Canonical text of the scene's content; equal keys draw identical images."""
        parts = [f"bg{self.background}"]
        parts += [f"{o.colour}/{o.shape}/{o.size}/{o.cell}/{o.dx}/{o.dy}" for o in self.objects]
        return ";".join(parts)

    def at(self, cell: int) -> Obj | None:
        for o in self.objects:
            if o.cell == cell:
                return o
        return None


def scene_bucket(scene: Scene) -> int:
    """Bucket 0..99 of a scene, from a hash of its content (stable across runs and machines)."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return int.from_bytes(digest[:8], "little") % 100


def split_of(scene: Scene) -> str:
    b = scene_bucket(scene)
    for name, r in SPLIT_BUCKETS.items():
        if b in r:
            return name
    raise AssertionError(b)


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, min_objects: int = 1
) -> Scene:
    """Draws one scene: min_objects-4 objects (1-4 by default) of distinct kinds and cells."""
    n = int(rng.integers(min_objects, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    cells = sorted(rng.choice(4, size=n, replace=False).tolist())
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    colour_names = list(COLOURS)
    objs = []
    for cell, k in zip(cells, kinds):
        size = ("small", "large")[int(rng.integers(2))]
        slack = CELL // 2 - SIZES[size] - 1  # keeps the object inside its cell
        dx, dy = (int(v) for v in rng.integers(-slack, slack + 1, size=2))
        objs.append(
            Obj(colour_names[k // len(SHAPES)], SHAPES[k % len(SHAPES)], size, cell, dx, dy)
        )
    return Scene(tuple(objs), background=int(rng.integers(0, 50)))


def iter_split_scenes(split: str, seed: int, min_objects: int = 1):
    """Endless stream of scenes of one split (rejection by content bucket), deterministic in seed."""
    buckets = SPLIT_BUCKETS[split]
    rng = np.random.default_rng(seed)
    while True:
        s = sample_scene(rng, min_objects=min_objects)
        if scene_bucket(s) in buckets:
            yield s


def _shape_mask(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    """Boolean [S, S] mask of one shape centred at (cx, cy) with half-extent r."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    ax, ay = xs - cx, ys - cy
    if shape == "square":
        return (np.abs(ax) <= r - 1) & (np.abs(ay) <= r - 1)
    if shape == "circle":
        return ax**2 + ay**2 <= r * r + 1
    if shape == "triangle":  # pointing up: apex at top, base at bottom
        t = (ay + r) / (2 * r)  # 0 at apex row, 1 at base row
        return (ay >= -r) & (ay <= r) & (np.abs(ax) <= t * r + 0.5)
    if shape == "cross":  # a plus sign
        w = max(1, r // 3)
        inside = (np.abs(ax) <= r) & (np.abs(ay) <= r)
        return inside & ((np.abs(ax) <= w) | (np.abs(ay) <= w))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Draws a scene. Returns uint8 [S, S, 3] (HWC)."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.uint8)
    for o in scene.objects:
        cx, cy = o.centre()
        img[_shape_mask(o.shape, cx, cy, SIZES[o.size])] = COLOURS[o.colour]
    return img


def image_processor_config() -> dict:
    """HF `preprocessor_config.json` content for the toy images (CLIPImageProcessor fields)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def cell_targets(scene: Scene) -> np.ndarray:
    """What each grid cell holds, as class ids: int32 [4, 3] of (colour, shape, size).

    0 means an empty cell; colour 1..5, shape 1..4 and size 1..2 follow COLOURS, SHAPES and
    SIZES. Training supervises the vision tower with it (`toy.train`), never evaluation.
    """
    out = np.zeros((4, 3), np.int32)
    colours, sizes = list(COLOURS), list(SIZES)
    for o in scene.objects:
        out[o.cell] = (
            colours.index(o.colour) + 1,
            SHAPES.index(o.shape) + 1,
            sizes.index(o.size) + 1,
        )
    return out


def patch_cells(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """The grid cell (0..3, as POSITIONS) of each visual token, in CLIP's row-major patch order."""
    g = image_size // patch_size
    py, px = np.divmod(np.arange(g * g), g)
    return ((py * 2 // g) * 2 + px * 2 // g).astype(np.int32)


def num_visual_tokens(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """Visual tokens per image under LLaVA's `default` strategy (CLS dropped)."""
    return (image_size // patch_size) ** 2

"""A FitPrune recipe: how many visual tokens each decoder layer keeps, and what it was fitted
for; read, written and checked against a model. Fitting is `tokens/fit.py`, applying it
`tokens/apply.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ellava_jax.config import LlavaConfig
from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file
from ellava_jax.outputs import atomic_file

FORMAT = "ellava-jax/fitprune-recipe/1"
# How apply ranks visual tokens: attention from text tokens, or that times the attention from
# the image's own visual tokens (tokens/apply.py::visual_scores).
SCORES = ("text", "text_x_visual")


class RecipeMismatchError(UserError):
    """A recipe fitted for another model (different sizes) than the one it is applied to."""


def model_signature(config: LlavaConfig) -> dict:
    """The sizes a recipe depends on: its layer count, token count and FLOPs model."""
    t = config.text
    return {
        "num_hidden_layers": t.num_hidden_layers,
        "num_image_tokens": config.num_image_tokens,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "image_token_index": config.image_token_index,
    }


@dataclass(frozen=True)
class Recipe:
    """Visual tokens kept per image after each decoder layer, and what it was fitted for."""

    keep: tuple[int, ...]
    model: dict = field(default_factory=dict)  # model_signature of the fitted model
    target_reduction: float = 0.0  # the prefill FLOPs reduction asked for
    flops_reduction: float = 0.0  # the one the recipe reaches on the reference prompt
    alpha: float = 0.0  # the tolerance found by the search
    text_tokens: int = 0  # reference prompt: text tokens ...
    images: int = 1  # ... and images
    flops_scope: str = "visual"  # 'visual': its visual tokens only; 'prompt': all its tokens
    samples: int = 0  # calibration samples
    score: str = "text"  # how apply ranks tokens (see apply.visual_scores)
    start_layer: int = 0  # the first layer that drops tokens
    divergence: dict = field(default_factory=dict)  # start layer -> calibration KL (when chosen)
    seconds: float = 0.0  # fitting time

    def __post_init__(self):
        object.__setattr__(self, "keep", tuple(int(k) for k in self.keep))
        if self.score not in SCORES:
            raise UserError(f"recipe score {self.score!r} is not one of {SCORES}")
        if any(b > a for a, b in zip(self.keep, self.keep[1:])):
            raise UserError(f"recipe keep counts must not grow over layers: {list(self.keep)}")

    def check(self, config: LlavaConfig) -> None:
        """Raises RecipeMismatchError when the recipe was fitted for a model of other sizes."""
        sig = model_signature(config)
        diff = {k: (self.model.get(k), v) for k, v in sig.items() if self.model.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: recipe {a} vs model {b}" for k, (a, b) in diff.items())
            raise RecipeMismatchError(f"token recipe was fitted for another model ({detail})")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep"] = list(self.keep)
        return {"format": FORMAT, **d}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the recipe JSON atomically (a killed write leaves the old file or none)."""
        with atomic_file(path) as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, d: dict, where: str = "recipe") -> Recipe:
        if d.get("format") != FORMAT:
            raise UserError(f"{where}: not a FitPrune recipe (format {d.get('format')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"format"})
        if unknown:
            raise UserError(f"{where}: unknown recipe field(s) {unknown}")
        if "keep" not in d or "model" not in d:
            raise UserError(f"{where}: a recipe needs 'keep' and 'model'")
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def load(cls, path: str | os.PathLike, config: LlavaConfig | None = None) -> Recipe:
        """Reads a recipe; with `config`, also checks that it was fitted for that model."""
        path = os.fspath(path)

        check_file(path, "recipe file")
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: not a FitPrune recipe (a JSON {type(d).__name__})")
        try:
            recipe = cls.from_json(d, path)
        except (TypeError, ValueError) as e:
            if isinstance(e, UserError) and str(e).startswith(path):
                raise
            raise UserError(f"{path}: {e}") from None
        if config is not None:
            try:
                recipe.check(config)
            except RecipeMismatchError as e:
                raise RecipeMismatchError(f"{path}: {e}") from None
        return recipe


def load_recipe(path: str | os.PathLike, config: LlavaConfig | None = None) -> Recipe:
    """`Recipe.load`: reads a recipe JSON, checked against `config` when given."""
    return Recipe.load(path, config)


def keep_all(config: LlavaConfig) -> Recipe:
    """The recipe that drops nothing."""
    n = config.num_image_tokens
    return Recipe((n,) * config.text.num_hidden_layers, model_signature(config))


# ---------------------------------------------------------------------------------------------
# Attention statistics and the simulated pruned prefill

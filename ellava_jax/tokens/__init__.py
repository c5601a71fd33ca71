"""FitPrune visual-token pruning: recipe fitting (`recipe`) and application (`apply`)."""

from ellava_jax.tokens.apply import forward_with_recipe, generate_with_recipe, layer_widths
from ellava_jax.tokens.recipe import (
    Calibration,
    Recipe,
    RecipeMismatchError,
    calibration_for,
    fit_recipe,
    keep_all,
    model_signature,
)

__all__ = [
    "Calibration",
    "Recipe",
    "RecipeMismatchError",
    "calibration_for",
    "fit_recipe",
    "forward_with_recipe",
    "generate_with_recipe",
    "keep_all",
    "layer_widths",
    "model_signature",
]

"""FitPrune visual-token pruning: the recipe (`recipe`), its fitting (`fit`), its application
(`apply`)."""

from ellava_jax.tokens.apply import (
    forward_with_recipe,
    generate_with_recipe,
    last_logits_with_recipe,
    layer_widths,
    recipe_last_logits,
)
from ellava_jax.tokens.fit import Calibration, fit_recipe
from ellava_jax.tokens.recipe import (
    Recipe,
    RecipeMismatchError,
    keep_all,
    load_recipe,
    model_signature,
)

__all__ = [
    "Calibration",
    "Recipe",
    "RecipeMismatchError",
    "fit_recipe",
    "forward_with_recipe",
    "generate_with_recipe",
    "keep_all",
    "last_logits_with_recipe",
    "layer_widths",
    "load_recipe",
    "model_signature",
    "recipe_last_logits",
]

"""ellava-jax: EfficientLLaVA auto-pruning and FitPrune token pruning for LLaVA, in JAX/Flax."""

__version__ = "0.1.0"

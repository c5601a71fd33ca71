"""The EfficientLLaVA search: policy space, fitness, evolution, projector training."""

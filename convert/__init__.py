"""Bridges to other ecosystems: HF safetensors, ONNX, DeepSparse."""

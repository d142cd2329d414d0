"""Weights in and out: GGUF and HF safetensors readers, our orbax checkpoint, the model registry."""

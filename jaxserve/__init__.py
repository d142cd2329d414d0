"""jaxserve: an LLM inference engine and server on JAX."""

__version__ = "0.1.0"

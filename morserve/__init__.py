"""morserve: an inference serving engine for Mixture-of-Recursions language models."""

__version__ = "0.1.0"

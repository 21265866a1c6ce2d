"""evalsuite: quantization accuracy and regression suite for causal language models."""

__version__ = "0.1.0"

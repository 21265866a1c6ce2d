"""Stage 1 of the pipeline: load."""

from evalsuite.load.model import LoadedModel, ModelInfo, default_model_path, forward_logits, load_model, transformer_blocks

__all__ = ["LoadedModel", "ModelInfo", "default_model_path", "forward_logits", "load_model", "transformer_blocks"]

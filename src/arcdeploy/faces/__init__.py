"""Faces in: decoding, 5-point alignment and preprocessing into model input."""
from .preprocess import ALIGNED_SIZE, to_model_input

__all__ = ["ALIGNED_SIZE", "to_model_input"]

"""Reference CNNs (torchvision layouts, defined locally) used as inputs for onnxmerge."""
from .registry import DIGITS_SHAPE, INPUT_SHAPES, MODELS, build, default_input_shape, randomize_bn

__all__ = ["DIGITS_SHAPE", "INPUT_SHAPES", "MODELS", "build", "default_input_shape", "randomize_bn"]

"""PyTorch reference implementation of the jaxclf classifier (for parity tests and export checks)."""

from torch_ref.loader import load, TorchClassifier
from torch_ref.model import TransformerClassifier

__all__ = ["load", "TorchClassifier", "TransformerClassifier"]

"""bagel: BAGEL-style unified multimodal models (packed Mixture-of-Transformers, flow matching)."""

__version__ = "0.2.0"

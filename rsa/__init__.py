"""rsa: the trainer layer for risk-aware stepwise alignment on Hugging Face models."""
__version__ = "0.1.0"

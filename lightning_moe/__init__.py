"""lightning_moe: decentralized mixture-of-experts training for PyTorch Lightning."""

__version__ = "0.1.0"

"""minisafe: find and protect the safety layers of aligned language models, in plain PyTorch."""

from minisafe.checkpoint import load, save

__all__ = ["load", "save"]

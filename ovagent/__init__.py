"""ov: a local-first, zero-knowledge secrets vault and its agent."""

__version__ = "0.1.0"

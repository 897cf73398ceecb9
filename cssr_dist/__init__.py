"""cssr-dist: distributed open-set recognition with Class-Specific Semantic Reconstruction."""

__version__ = "0.1.0"

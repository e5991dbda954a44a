"""rayseg: scene-level tags -> per-point pseudo-labels -> a 3D segmenter, on Ray."""

__version__ = "0.1.0"

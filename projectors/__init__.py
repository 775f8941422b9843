"""Projectors: map visual-expert token grids to LLM embeddings."""

from .mlp import MLPProjector, build_projector

__all__ = ["MLPProjector", "build_projector"]

"""Projectors: map visual-expert token grids to LLM embeddings."""

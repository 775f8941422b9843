"""Gradio demo (calls mm.inference only)."""

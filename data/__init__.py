"""Data: media decoding, ShapesWorld, LLaVA JSON schema, boxes, chat templates, processor."""

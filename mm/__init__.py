"""mmstack core: the VLM model, positions, training, inference and the `mm` command."""

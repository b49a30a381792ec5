"""Model folders: validated before anything runs, loaded as the PyTorch reference, and the
registered architectures."""

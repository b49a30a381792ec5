"""Data readers, quantization recipes and the bundled sample data (see data/README.md)."""

"""The core every layer builds on: errors, artifacts and manifests, ONNX I/O, targets.

Nothing here imports from any other wing of ``bert_compiler`` (the import-linter contracts in
pyproject.toml enforce it).
"""

__version__ = "0.1.0"

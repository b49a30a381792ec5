"""The core every layer builds on: errors, artifacts and manifests, ONNX I/O, targets.

Nothing here imports from ``bert_compiler.pipeline``, ``bert_compiler.engines`` or
``bert_compiler.calibration`` (the import-linter contracts in pyproject.toml enforce it).
"""

__version__ = "0.1.0"

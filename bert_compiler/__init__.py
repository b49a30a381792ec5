"""bert-compiler: Hugging Face BERT-family encoders compiled into verified inference engines.

The wings: core/ (artifacts, manifests, errors, locks, targets), calibration/ (INT8 and fp8
ranges and Q/DQ graphs), engines/ (the backends: ONNX Runtime, the torch engine, TensorRT),
pipeline/ (the stages, the CLI, the runtime, benchmarks) and pipeline/triton/ (packaging, the
gate, serving). The layer rule between them is [tool.importlinter] in pyproject.toml.
"""

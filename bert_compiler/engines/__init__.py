"""Inference backends, one module each, each with one ``Backend`` object (engines/backend.py).

Each backend module builds an engine from a graph, loads it with its recorded options and runs
numpy feeds through it; its ``Backend`` object tells the pipeline everything else that differs by
backend. Importing this package registers every backend. Heavy imports (onnxruntime, tensorrt)
happen inside functions, so every module imports on a machine without them.
"""

# Each import registers that module's Backend object (engines/backend.py: register).
from bert_compiler.engines import onnxruntime, tensorrt, torch_encoder  # noqa: F401

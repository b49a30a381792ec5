"""Inference backends, one module each, with the same small surface.

Each backend module exposes ``build_engine`` (source graph -> engine file), ``load`` (engine file +
recorded options -> engine) and the engine's ``run`` (numpy feeds -> named numpy outputs). Heavy
imports (onnxruntime, tensorrt) happen inside those functions, so every module imports on a machine
without them.
"""

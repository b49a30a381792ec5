"""Triton Inference Server: the model repository of verified engines and its deployment gate."""

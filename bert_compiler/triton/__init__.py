"""Triton Inference Server: the model repository of verified engines, its deployment gate, the
Python-backend models it holds, and the local server of `serve`."""

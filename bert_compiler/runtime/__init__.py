"""Texts in, engine outputs out: the Encoder (batching, streaming, the GPU pipeline), tokenization
bit-identical to Hugging Face (token_rows, text) and the parity measures verify applies."""
